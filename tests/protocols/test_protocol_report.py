"""Report math (HM, Average = HM of means, mean ± std), tables, CSV, plots, labels, banner, reference."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from fakeruns import make_run

from vlprompt.cli.main import main
from vlprompt.errors import VlpromptError
from vlprompt.protocols import plots
from vlprompt.protocols import report as rep
from vlprompt.protocols.reference import LABEL
from vlprompt.protocols.report import RANDOM_BANNER, build_report, harmonic_mean, mean_std, method_label

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# caltech101: base 90/92/94 (mean 92, std sqrt(8/3)), new 80/80/80; eurosat: base 60/70/80, new 40/50/60
B2N = {
    "caltech101": [(90.0, 80.0), (92.0, 80.0), (94.0, 80.0)],
    "eurosat": [(60.0, 40.0), (70.0, 50.0), (80.0, 60.0)],
}


def _base2new_runs(root: Path, method: str = "coop", scale: float = 1.0, **kw) -> None:
    for ds, seeds in B2N.items():
        for seed, (b, n) in enumerate(seeds, 1):
            make_run(
                root,
                "base2new",
                method,
                ds,
                16,
                seed,
                {(ds, "base"): b * scale, (ds, "new"): n * scale},
                **kw,
            )


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_hm_and_mean_std() -> None:
    assert harmonic_mean(92.0, 80.0) == pytest.approx(2 * 92 * 80 / 172)
    assert harmonic_mean(0.0, 0.0) == 0.0
    ms = mean_std([90.0, 92.0, 94.0])
    assert (ms.mean, ms.n) == (92.0, 3) and ms.std == pytest.approx(math.sqrt(8 / 3))  # population std
    assert str(ms) == "92.00 ± 1.63" and str(mean_std([50.0])) == "50.00"
    assert mean_std([]) is None


def test_base2new_table_values(tmp_path: Path) -> None:
    _base2new_runs(tmp_path / "runs")
    res = build_report(tmp_path / "runs", tmp_path / "out", plots=False)
    rows = {r["Data set"]: r for r in _csv(tmp_path / "out" / "base2new_coop.csv")}
    cal, euro, avg = rows["Caltech101"], rows["EuroSAT"], rows["Average (2 data sets)"]
    assert float(cal["Base mean"]) == pytest.approx(92.0) and float(cal["Base std"]) == pytest.approx(
        1.63299, abs=1e-4
    )
    assert float(cal["New mean"]) == pytest.approx(80.0) and float(cal["New std"]) == 0.0
    assert cal["Base n"] == "3" and cal["seeds"] == "3"
    assert float(cal["HM"]) == pytest.approx(85.5814, abs=1e-4)  # HM of the seed means
    assert float(euro["HM"]) == pytest.approx(58.3333, abs=1e-4)
    # Average row: HM(mean B, mean N) = HM(81, 65) = 72.1233, NOT the mean of per-data-set HMs (71.9574)
    assert float(avg["Base mean"]) == pytest.approx(81.0) and float(avg["New mean"]) == pytest.approx(65.0)
    assert float(avg["HM"]) == pytest.approx(2 * 81 * 65 / 146, abs=1e-4)
    assert abs(float(avg["HM"]) - (85.5814 + 58.3333) / 2) > 0.1
    md = res.markdown.read_text()
    assert "| Caltech101 | 92.00 ± 1.63 | 80.00 ± 0.00 | 85.58 | 3 |" in md
    assert "| Average (2 data sets) | 81.00 | 65.00 | 72.12 |" in md
    assert RANDOM_BANNER not in md and not res.random_backbone
    assert LABEL not in md  # no published numbers unless asked
    # per-run CSV: every evaluation, one row each
    assert len(_csv(tmp_path / "out" / "runs.csv")) == 12


def test_comparison_table_and_dpl_marking(tmp_path: Path, monkeypatch) -> None:
    _base2new_runs(tmp_path / "runs", "coop")
    _base2new_runs(tmp_path / "runs", "dpl", scale=0.5)
    seen: dict = {}
    original = plots.base2new_bars

    def capture(data, out_dir, title_suffix=""):
        seen.update({k: dict(v) for k, v in data.items()})
        return original(data, out_dir, title_suffix)

    monkeypatch.setattr(plots, "base2new_bars", capture)
    res = build_report(tmp_path / "runs", tmp_path / "out")
    dpl = "DPL (reconstructed from the paper's abstract)"
    assert method_label("dpl") == dpl
    assert method_label("dpl-visual") == "DPL-visual (reconstructed from the paper's abstract)"
    assert method_label("maple") == "MaPLe"
    md = res.markdown.read_text()
    assert f"### Base-to-new: {dpl}" in md
    rows = {r["Data set"]: r for r in _csv(tmp_path / "out" / "base2new_comparison.csv")}
    assert float(rows["Caltech101"]["CoOp HM"]) == pytest.approx(85.5814, abs=1e-4)
    assert float(rows["Caltech101"][f"{dpl} HM"]) == pytest.approx(85.5814 / 2, abs=1e-4)
    assert float(rows["Average"][f"{dpl} HM"]) == pytest.approx(2 * 40.5 * 32.5 / 73, abs=1e-4)
    # plot legends carry the DPL note too
    assert set(seen["Caltech101"]) == {"CoOp", dpl}
    assert seen["Average"][dpl]["values"] == pytest.approx((40.5, 32.5, 2 * 40.5 * 32.5 / 73))
    assert seen["Caltech101"]["CoOp"]["std"][0] == pytest.approx(1.63299, abs=1e-4)  # seed error bar
    assert seen["Caltech101"]["CoOp"]["published"] is None  # no markers unless --reference


def test_random_backbone_banner(tmp_path: Path) -> None:
    _base2new_runs(tmp_path / "runs", pretrained=None)  # no tag, no weights file -> random init
    res = build_report(tmp_path / "runs", tmp_path / "out", plots=False)
    first = res.markdown.read_text().splitlines()[:4]
    assert res.random_backbone and any(RANDOM_BANNER in line for line in first)
    # an explicit flag in env.json wins even over a pretrained tag in config.yaml
    make_run(
        tmp_path / "r2",
        "fewshot",
        "coop",
        "demo",
        1,
        1,
        {("demo", "all"): 10.0},
        env={"backbone": {"source": "random-init"}},
    )
    assert build_report(tmp_path / "r2", tmp_path / "o2", plots=False).random_backbone
    make_run(tmp_path / "r3", "fewshot", "coop", "demo", 1, 1, {("demo", "all"): 10.0})
    assert not build_report(tmp_path / "r3", tmp_path / "o3", plots=False).random_backbone


def test_reference_columns_labelled(tmp_path: Path) -> None:
    _base2new_runs(tmp_path / "runs")
    res = build_report(tmp_path / "runs", tmp_path / "out", reference=True, plots=False)
    rows = {r["Data set"]: r for r in _csv(tmp_path / "out" / "base2new_coop.csv")}
    assert float(rows["Caltech101"]["HM (pub.)"]) == 93.73
    assert float(rows["Caltech101"]["Base (pub.)"]) == 98.00
    assert float(rows["EuroSAT"]["HM (pub.)"]) == 68.69
    avg = rows["Average (2 data sets)"]
    # like with like: the published numbers of the same two data sets, not the papers' 11-set 71.66
    assert float(avg["HM (pub.)"]) == pytest.approx((93.73 + 68.69) / 2)
    assert avg["Base (pub.)"] == "" and avg["New (pub.)"] == ""  # EuroSAT's published Base/New not stored
    comp = {r["Data set"]: r for r in _csv(tmp_path / "out" / "base2new_comparison.csv")}
    assert float(comp["Caltech101"]["CoOp HM (pub.)"]) == 93.73
    assert float(comp["Average"]["CoOp HM (pub.)"]) == pytest.approx((93.73 + 68.69) / 2)
    pub = {r["Method"]: r for r in _csv(tmp_path / "out" / "published_base2new.csv")}
    assert float(pub["PromptSRC"]["HM (pub.)"]) == 79.97
    md = res.markdown.read_text()
    assert md.count(LABEL) == 1 and "not produced by this package" in md  # one legend line
    assert "mean of the papers' per-data-set HM" in md


def test_transfer_and_fewshot_tables_and_plots(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed, (src, cal, euro) in enumerate([(70.0, 50.0, 30.0), (72.0, 60.0, 40.0)], 1):
        evals = {("imagenet", "all"): src, ("caltech101", "all"): cal, ("eurosat", "all"): euro}
        make_run(runs, "cross-dataset", "maple", "imagenet", 16, seed, evals)
    for seed, (v2, sk) in enumerate([(60.0, 40.0), (62.0, 44.0)], 1):
        evals = {("imagenet", "all"): 70.0, ("imagenetv2", "all"): v2, ("imagenet_sketch", "all"): sk}
        make_run(runs, "dg", "maple", "imagenet", 16, seed, evals)
    log = [
        {
            "epoch": 0,
            "step": i,
            "loss": 2.0 - 0.1 * i,
            "acc": 10.0 * i,
            "lr": 1e-5,
            "images_per_s": 5.0,
            "time": i,
        }
        for i in range(5)
    ]
    for k, accs in {1: (20.0, 30.0), 4: (50.0, 70.0)}.items():
        for seed, a in enumerate(accs, 1):
            make_run(runs, "fewshot", "coop", "demo", k, seed, {("demo", "all"): a}, log=log)
    make_run(runs, "fewshot", "coop", "demo", 8, 1, {}, done=False)  # incomplete: listed, not tabulated
    res = build_report(runs, tmp_path / "out", reference=True)
    cross = _csv(tmp_path / "out" / "cross_dataset.csv")
    ours = cross[0]
    assert ours["Method"] == "MaPLe"
    assert float(ours["Caltech101 mean"]) == 55.0 and float(ours["EuroSAT mean"]) == 35.0
    assert float(ours["ImageNet (source) mean"]) == 71.0
    assert float(ours["Average (targets)"]) == 45.0  # plain mean over targets, source excluded
    assert not any("(pub.)" in r["Method"] for r in cross)  # 2 of 10 targets: no 10-target average beside it
    dg = _csv(tmp_path / "out" / "dg.csv")
    assert float(dg[0]["Average (targets)"]) == pytest.approx((61.0 + 42.0) / 2)
    assert float(dg[0]["ImageNet-V2 mean"]) == 61.0 and float(dg[0]["ImageNet-Sketch mean"]) == 42.0
    assert float(dg[0]["ImageNet-V2 std"]) == 1.0
    fs = {r["Shots (K)"]: r for r in _csv(tmp_path / "out" / "fewshot_demo.csv")}
    assert set(fs) == {"1", "4"}
    assert float(fs["1"]["CoOp mean"]) == 25.0 and float(fs["4"]["CoOp std"]) == 10.0
    md = res.markdown.read_text()
    assert "Failed and incomplete runs" in md and "shots8_seed1" in md
    assert "cover all 10 targets" in md
    assert "not comparable" in md  # only 2 of 10 cross-dataset targets evaluated
    names = {p.name for p in res.plots}
    assert "fewshot_Demo_scikit-learn_digits.png" in names
    assert sum(n.startswith("train_") for n in names) == 1  # one figure for fewshot/coop/demo, a line per run
    for p in res.plots:
        blob = p.read_bytes()
        assert blob[:8] == PNG_MAGIC and len(blob) > 2000
        import matplotlib.pyplot as plt

        h, w = plt.imread(p).shape[:2]
        assert h > 100 and w > 100
        assert f"plots/{p.name}" in md


def test_base2new_plots_are_pngs(tmp_path: Path) -> None:
    _base2new_runs(tmp_path / "runs")
    res = build_report(tmp_path / "runs", tmp_path / "out")
    names = sorted(p.name for p in res.plots)
    assert names == ["base2new_Average.png", "base2new_Caltech101.png", "base2new_EuroSAT.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in res.plots)


def test_training_curve_from_log(tmp_path: Path) -> None:
    steps = [{"epoch": e, "step": s, "loss": 1.0, "acc": 50.0} for e in (0, 1) for s in (1, 2)]
    d = make_run(tmp_path, "fewshot", "coop", "demo", 1, 1, {}, log=steps)
    assert [p[0] for p in rep.read_training_curve(d)] == [0, 1, 2, 3]  # per-epoch step counter restarts
    glob = [{"epoch": 0, "step": s, "loss": 2.0 / s, "acc": None} for s in (1, 2, 3)]
    glob.append({"kind": "epoch", "epoch": 0, "step": 3, "loss": 0.5, "acc": 40.0})
    d = make_run(tmp_path, "fewshot", "coop", "demo", 1, 2, {}, log=glob)
    assert rep.read_training_curve(d) == [(1.0, 2.0, None), (2.0, 1.0, None), (3.0, 2.0 / 3, None)]


def test_report_cli(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "runs directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no complete run" in capsys.readouterr().err
    _base2new_runs(tmp_path / "runs", pretrained=None)
    assert main(["report", str(tmp_path / "runs"), "--no-plots", "--reference"]) == 0
    out = capsys.readouterr().out
    assert RANDOM_BANNER in out and "6 runs ->" in out
    assert (tmp_path / "runs" / "report" / "report.md").is_file()
    with pytest.raises(VlpromptError, match="runs directory not found: .*nope"):
        build_report(tmp_path / "nope")


def test_transfer_on_sets_outside_the_real_suite_names_no_missing_targets(tmp_path: Path) -> None:
    """World runs (source world-colour-shape, world targets) are not a partial real suite: no note listing
    Caltech101 ... as 'not evaluated', which it would be nonsense to evaluate there."""
    runs = tmp_path / "runs"
    for seed in (1, 2):
        evals = {("world-colour-shape", "all"): 60.0, ("world-shapes", "all"): 50.0 + seed}
        make_run(runs, "cross-dataset", "coop", "world-colour-shape", 16, seed, evals)
    md = build_report(runs, tmp_path / "out").markdown.read_text()
    assert "Cross-dataset" in md and "not comparable" not in md and "caltech101" not in md
