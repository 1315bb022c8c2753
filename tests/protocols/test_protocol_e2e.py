"""End to end on the real trainer: `vlprompt run` (base2new, coop, demo, vlp-tiny, 1 epoch) then `report`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from fakeruns import demo_grid_argv

from vlprompt.cli.main import main
from vlprompt.protocols.report import RANDOM_BANNER, harmonic_mean

pytest.importorskip("vlprompt.run")


@pytest.mark.slow
def test_run_then_report(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    argv = demo_grid_argv(runs)
    assert main(argv) == 0
    assert "1 runs: 1 done, 0 skipped (complete), 0 failed" in capsys.readouterr().out
    run = runs / "base2new" / "coop" / "demo" / "shots2_seed1"
    for name in (
        "config.yaml",
        "env.json",
        "split.json",
        "metrics.json",
        "log.jsonl",
        "prompt.safetensors",
        "manifest.json",
        "done",
    ):
        assert (run / name).is_file(), name
    evals = {
        (e["dataset"], e["subsample"]): e
        for e in json.loads((run / "metrics.json").read_text())["evaluations"]
    }
    assert set(evals) == {("demo", "base"), ("demo", "new")}
    assert evals[("demo", "base")]["n_classes"] == 5 and evals[("demo", "new")]["n_classes"] == 5

    assert main(argv) == 0  # complete: skipped, nothing retrained
    assert "1 skipped (complete)" in capsys.readouterr().out

    assert main(["report", str(runs)]) == 0
    md = (runs / "report" / "report.md").read_text()
    assert RANDOM_BANNER in md.splitlines()[2]
    with open(runs / "report" / "base2new_coop.csv", newline="") as f:
        row = next(csv.DictReader(f))
    b, n = evals[("demo", "base")]["accuracy"], evals[("demo", "new")]["accuracy"]
    assert float(row["Base mean"]) == pytest.approx(b, abs=1e-4) and float(row["New mean"]) == pytest.approx(
        n, abs=1e-4
    )
    assert float(row["HM"]) == pytest.approx(harmonic_mean(b, n), abs=1e-4)
    plots = sorted(p.name for p in (runs / "report" / "plots").iterdir())
    assert plots == [
        "base2new_Demo_scikit-learn_digits.png",
        "confusion_base2new_coop_demo_s2_seed1_demo_base.png",  # one confusion matrix per evaluation
        "confusion_base2new_coop_demo_s2_seed1_demo_new.png",
        "cost.png",  # cost per method x protocol (report/cost.md)
        "train_base2new_CoOp_demo.png",
    ]
