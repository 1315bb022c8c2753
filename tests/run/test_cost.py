"""The cost of every run: metrics.json's cost fields (exact counts, measured times and memory), the
report's cost page (sums, totals, plot) and the dry-run projection's plan (the runs' real counts)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from vlprompt.cli.main import main
from vlprompt.protocols.cost_report import write_cost_report
from vlprompt.run import RunDir, evaluate_run, train_run
from vlprompt.train.config import RunRequest, resolve_config


def _cfg(epochs: int = 3):
    return resolve_config(
        "coop", "demo", shots=4, seed=1, subsample="base", model="vlp-tiny", epochs=epochs,
        overrides=["train.batch_size=4"],
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cost") / "run"
    train_run(_cfg(), out, progress=False)
    evaluate_run(out, subsample="new")
    return out


def test_training_and_evaluations_record_their_cost(trained):
    m = json.loads((trained / "metrics.json").read_text())
    t = m["cost"]["train"]
    # 5 base classes x 4 shots = 20 images, batch 4 -> 5 steps per epoch (exact, not measured)
    assert (t["epochs"], t["steps"], t["images"], t["resumed_from_epoch"]) == (3, 15, 60, 0)
    assert t["device"] == "cpu" and t["precision"] == "fp32"
    assert t["peak_gpu_mb"] is None  # no GPU here: nothing is made up
    assert t["wall_s"] > t["eval_s"] > 0 and t["wall_s"] > t["loop_s"] > 0 and t["cpu_s"] > 0
    assert t["images_per_s"] == pytest.approx(60 / t["loop_s"], rel=1e-2)
    assert 50 < t["peak_rss_mb"] < 64_000
    own, new = m["evaluations"]
    assert (own["subsample"], new["subsample"]) == ("base", "new")
    assert own["cost"]["images"] == own["n"] and new["cost"]["images"] == new["n"]
    assert own["cost"]["wall_s"] == pytest.approx(t["eval_s"], abs=1e-3)
    assert new["cost"]["cpu_s"] > 0 and new["cost"]["peak_rss_mb"] > 50
    assert new["cost"]["images_per_s"] == pytest.approx(new["n"] / new["cost"]["wall_s"], rel=1e-2)


def test_a_resumed_run_counts_every_epoch_and_says_it_resumed(trained, tmp_path):
    out = tmp_path / "run"
    assert train_run(_cfg(), out, progress=False, stop_after_epoch=1)["status"] == "stopped"
    assert not (out / "metrics.json").exists()
    train_run(_cfg(), out, progress=False)
    t = json.loads((out / "metrics.json").read_text())["cost"]["train"]
    ref = json.loads((trained / "metrics.json").read_text())["cost"]["train"]
    assert (t["steps"], t["images"], t["epochs"]) == (ref["steps"], ref["images"], ref["epochs"])
    assert t["resumed_from_epoch"] == 1


def _record(path: Path, protocol: str, method: str):
    class R:  # what the report's RunRecord offers the cost page
        pass

    r = R()
    r.path, r.protocol, r.method = path, protocol, method
    return r


def _fake(root: Path, name: str, train: dict | None, evals: list[dict]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    metrics = {"evaluations": [{"dataset": "demo", "subsample": "all", "accuracy": 1.0, **e} for e in evals]}
    if train is not None:
        metrics["cost"] = {"train": train}
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def test_cost_page_sums_per_method_and_protocol(tmp_path):
    t = {"wall_s": 100.0, "cpu_s": 150.0, "eval_s": 10.0, "steps": 40, "images": 160, "loop_s": 80.0,
         "peak_rss_mb": 900.0, "peak_gpu_mb": None, "device": "cpu"}  # fmt: skip
    e = {"cost": {"wall_s": 10.0, "images": 500, "peak_rss_mb": 1000.0}}
    runs = [
        _record(
            _fake(tmp_path, "a", t, [e, {"cost": {"wall_s": 5.0, "cpu_s": 4.0, "images": 250}}]),
            "b2n",
            "coop",
        ),
        _record(_fake(tmp_path, "b", {**t, "peak_gpu_mb": 2048.0, "device": "cuda:0"}, [e]), "b2n", "coop"),
        _record(_fake(tmp_path, "c", t, [e]), "fewshot", "mpl"),
        _record(_fake(tmp_path, "d", None, [{}]), "fewshot", "mpl"),  # recorded before costs were kept
    ]
    files = write_cost_report(runs, tmp_path / "report")
    assert [f.name for f in files] == ["cost.md", "cost.csv", "cost.png"]
    rows = {
        (r["protocol"], r["method"]): r for r in csv.DictReader((tmp_path / "report" / "cost.csv").open())
    }
    coop = rows[("b2n", "coop")]
    assert (coop["runs"], coop["runs_with_cost"], coop["steps"], coop["train_images"]) == (
        "2",
        "2",
        "80",
        "320",
    )
    assert float(coop["train_wall_s"]) == 180.0  # 2 x (100 - the 10 s final evaluation)
    assert float(coop["train_images_per_s"]) == 2.0  # 320 images / 160 s in the training loops
    assert float(coop["eval_wall_s"]) == 25.0 and coop["eval_images"] == "1250"
    assert float(coop["peak_rss_mb"]) == 1000.0 and float(coop["peak_gpu_mb"]) == 2048.0
    assert coop["devices"] == "cpu,cuda:0"
    mpl = rows[("fewshot", "mpl")]
    assert (mpl["runs"], mpl["runs_with_cost"], mpl["peak_gpu_mb"]) == ("2", "1", "")
    total = rows[("all", "all")]
    assert (total["runs"], total["steps"], float(total["train_wall_s"])) == ("4", "120", 270.0)
    md = (tmp_path / "report" / "cost.md").read_text()
    assert "| **all** | **all** | **4 (3 with cost)** | **4.5 min** |" in md
    assert "![cost](plots/cost.png)" in md
    assert (tmp_path / "report" / "plots" / "cost.png").stat().st_size > 5000


def test_report_links_the_cost_page_and_dry_run_projects_the_real_counts(trained, tmp_path, capsys):
    from vlprompt.bench.projection import plan_runs
    from vlprompt.protocols.cost_report import LINK
    from vlprompt.protocols.grid import GridRequest, plan_grid

    argv = ["run", "--protocol", "base2new", "--method", "coop", "--datasets", "demo", "--seeds", "1",
            "--shots", "4", "--model", "vlp-tiny", "--epochs", "3", "--set", "train.batch_size=4",
            "--out", str(tmp_path / "runs"), "--no-progress"]  # fmt: skip
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 runs planned: 1 todo" in out
    assert "projected cost on this machine" in out and "of compute for the runs still to do" in out
    assert "  coop           1       15 " in out  # 15 steps, as the real run counted them
    run = RunRequest("coop", model="vlp-tiny", overrides=("train.batch_size=4",), epochs=3)
    specs = plan_grid(GridRequest("base2new", ["coop"], ["demo"], [1], tmp_path / "runs", shots=[4], run=run))
    (p,) = plan_runs(specs)
    t = json.loads((trained / "metrics.json").read_text())
    assert (p.steps, p.steps * p.batch) == (t["cost"]["train"]["steps"], t["cost"]["train"]["images"])
    assert p.eval_images == sum(e["n"] for e in t["evaluations"])
    assert main([*argv, "--jobs", "1"]) == 0
    report = tmp_path / "runs" / "report"
    assert LINK.strip() in (report / "report.md").read_text()
    assert "| base2new | coop | 1 |" in (report / "cost.md").read_text()
    assert RunDir(tmp_path / "runs" / "base2new" / "coop" / "demo" / "shots4_seed1").is_complete()


def test_train_announces_a_long_preset_only():
    from vlprompt.bench.projection import announce

    lines: list[str] = []
    short = resolve_config("coop", "demo", shots=16, seed=1, model="vlp-tiny", epochs=10)
    assert announce(short, lines.append) is None and lines == []  # 1,600 images: no probe
    long = resolve_config("coop", "demo", shots=16, seed=1, model="vlp-tiny", epochs=400)
    est = announce(long, lines.append)
    assert lines[0].startswith("coop: 400 epochs x 160 images (") and est is not None and est.seconds > 0
    assert "projected cost on this machine" in lines[1] and est.text == lines[1]
