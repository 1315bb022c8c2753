"""Reports a reader trusts: failed runs with their error, single runs, DPL marked, confusion, epoch curves."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from fakeruns import make_run

from vlprompt.protocols import report as rep
from vlprompt.protocols.report import build_report
from vlprompt.protocols.runner import record_failure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _with_confusion(run: Path, classes: list[str], counts: list[list[int]]) -> None:
    m = json.loads((run / "metrics.json").read_text())
    sparse = [[i, j, n] for i, row in enumerate(counts) for j, n in enumerate(row) if n]
    m["evaluations"][0]["confusion"] = {"classes": classes, "counts": sparse}
    (run / "metrics.json").write_text(json.dumps(m))


def test_failed_runs_show_their_error_and_single_runs_are_not_a_protocol(tmp_path):
    runs = tmp_path / "runs"
    make_run(
        runs,
        "base2new",
        "coop",
        "caltech101",
        16,
        1,
        {("caltech101", "base"): 90.0, ("caltech101", "new"): 80.0},
    )
    bad = make_run(runs, "base2new", "coop", "caltech101", 16, 2, {}, done=False)
    record_failure(bad, "loss became nan at epoch 3; lower train.lr")
    single = make_run(runs, "x", "dpl", "eurosat", 4, 1, {("eurosat", "all"): 33.0})
    cfg = (single / "config.yaml").read_text().replace("protocol: x", "protocol: null")
    (single / "config.yaml").write_text(cfg)
    record_failure(tmp_path / "never-created", "refused")  # no folder is made for a refused run
    assert not (tmp_path / "never-created").exists()
    res = build_report(runs, tmp_path / "out", plots=False)
    md = res.markdown.read_text()
    assert f"`{bad}`: **failed**: loss became nan at epoch 3; lower train.lr" in md
    assert "## Single runs" in md and "| DPL (reconstructed from the paper's abstract) | eurosat |" in md
    b2n = _csv(tmp_path / "out" / "base2new_coop.csv")
    assert [r["seeds"] for r in b2n if r["Data set"] == "Caltech101"] == ["1"]  # the failed seed is left out
    rows = _csv(tmp_path / "out" / "runs.csv")
    by_method = {r["method"]: r for r in rows}
    assert by_method["dpl"]["protocol"] == "single"
    assert "reconstructed from the paper's abstract" in by_method["dpl"]["reconstructed"]
    assert by_method["coop"]["reconstructed"] == ""


def test_a_trained_run_with_a_failed_evaluation_keeps_its_other_results_in_the_tables(tmp_path):
    runs = tmp_path / "runs"
    evals = {("world-colour-shape", "all"): 60.0, ("world-shapes", "all"): 50.0}
    part = make_run(runs, "cross-dataset", "prograd", "world-colour-shape", 16, 1, evals)
    record_failure(part, "trained; evaluation failed on world-count/all: too long", stage="evaluation")
    bad = make_run(runs, "cross-dataset", "coop", "world-colour-shape", 16, 1, evals)
    record_failure(bad, "loss became nan")  # a run-stage failure stays out of the tables
    md = build_report(runs, tmp_path / "out", plots=False).markdown.read_text()
    rows = {r["Method"]: r for r in _csv(tmp_path / "out" / "cross_dataset.csv")}
    assert set(rows) == {"ProGrad"}  # its recorded source and target results are reported
    assert "| ProGrad | 60.00 | 50.00 | 50.00 |" in md  # source, world-shapes, average
    assert f"`{part}`: **some evaluations failed** (the others are in the tables): trained;" in md
    assert f"`{bad}`: **failed**: loss became nan" in md


def test_imported_prompt_with_metrics_is_a_single_run(tmp_path):
    d = tmp_path / "runs" / "imported-maple"
    d.mkdir(parents=True)
    manifest = {
        "format": "vlprompt-prompt", "method": "maple", "dataset": None, "shots": None, "seed": None,
        "backbone": {"name": "ViT-B-16", "pretrained": "openai"}, "imported_from": {"format": "dassl"},
    }  # fmt: skip
    (d / "manifest.json").write_text(json.dumps(manifest))
    entry = {
        "dataset": "caltech101",
        "subsample": "new",
        "split": "test",
        "accuracy": 94.0,
        "macro_f1": 93.0,
        "n": 9,
    }
    (d / "metrics.json").write_text(json.dumps({"evaluations": [entry]}))
    md = build_report(tmp_path / "runs", tmp_path / "out", plots=False).markdown.read_text()
    assert "`imported-maple` (imported)" in md and "| 94.00 |" in md


def test_most_confused_pairs_and_confusion_figure(tmp_path):
    runs = tmp_path / "runs"
    run = make_run(runs, "fewshot", "coop", "demo", 1, 1, {("demo", "all"): 60.0})
    classes = ["cat", "dog", "fox"]
    _with_confusion(run, classes, [[5, 3, 0], [1, 6, 1], [0, 4, 4]])
    pairs = rep.most_confused(json.loads((run / "metrics.json").read_text())["evaluations"][0], k=3)
    assert pairs == [("fox", "dog", 4, 50.0), ("cat", "dog", 3, 37.5), ("dog", "cat", 1, 12.5)]
    res = build_report(runs, tmp_path / "out")
    table = {(r["True class"], r["Predicted as"]): r for r in _csv(tmp_path / "out" / "most_confused.csv")}
    assert table[("fox", "dog")]["images"] == "4" and float(table[("fox", "dog")]["% of true class"]) == 50.0
    figs = [p for p in res.plots if p.name.startswith("confusion_")]
    assert len(figs) == 1 and figs[0].read_bytes()[:8] == PNG_MAGIC
    assert f"plots/{figs[0].name}" in res.markdown.read_text()


def test_training_curve_is_against_epochs(tmp_path):
    log = [
        {"kind": "step", "epoch": e, "step": 3 * (e - 1) + s, "loss": 1.0 / s, "acc": 10.0 * s}
        for e in (1, 2)
        for s in (1, 2, 3)
    ]
    log += [{"kind": "epoch", "epoch": e, "step": 3 * e, "loss": 0.6, "acc": 20.0} for e in (1, 2)]
    d = make_run(tmp_path, "fewshot", "coop", "demo", 1, 1, {}, log=log)
    xs = [round(p[0], 4) for p in rep.read_epoch_curve(d)]
    assert xs == [0.3333, 0.6667, 1.0, 1.3333, 1.6667, 2.0]  # step k of 3 in epoch e at e-1+k/3
    only_epochs = make_run(
        tmp_path, "fewshot", "coop", "demo", 1, 2, {}, log=[r for r in log if r["kind"] == "epoch"]
    )
    assert rep.read_epoch_curve(only_epochs) == [(1.0, 0.6, 20.0), (2.0, 0.6, 20.0)]


def test_smoothing_is_an_ema():
    from vlprompt.protocols.plots import smooth

    assert smooth([0.0, 3.0, 3.0], window=2) == pytest.approx([0.0, 2.0, 2.6666667])
    assert smooth([]) == [] and smooth([5.0]) == [5.0]


def test_a_done_run_whose_prompt_or_manifest_is_gone_is_listed_as_damaged_not_as_data(tmp_path):
    """`done` alone does not make a run: with its manifest or prompt gone it was counted complete and
    (its backbone then unknown) labelled "random init" under the untrained-backbone banner."""
    runs = tmp_path / "runs"
    evals = {("caltech101", "base"): 90.0, ("caltech101", "new"): 80.0}
    good = make_run(runs, "base2new", "coop", "caltech101", 16, 1, evals)
    no_manifest = make_run(runs, "base2new", "coop", "caltech101", 16, 2, evals)
    (no_manifest / "manifest.json").unlink()
    no_prompt = make_run(runs, "base2new", "coop", "caltech101", 16, 3, evals)
    (no_prompt / "prompt.safetensors").unlink()
    md = build_report(runs, tmp_path / "out", plots=False).markdown.read_text()
    assert f"`{no_manifest}`: **failed**: marked done, but manifest.json is missing" in md
    assert f"`{no_prompt}`: **failed**: marked done, but prompt.safetensors is missing" in md
    b2n = _csv(tmp_path / "out" / "base2new_coop.csv")
    assert [r["seeds"] for r in b2n if r["Data set"] == "Caltech101"] == ["1"]
    assert good.is_dir()
