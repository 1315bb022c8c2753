"""Zero-shot CLIP as a grid method and a report row; runs that learned nothing say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlprompt.cli.main import main
from vlprompt.protocols.report import build_report

DATASET = "world-shapes"  # 8 classes: base = 4, new = 4; the smallest world set


def _grid(runs: Path, method: str, *extra: str) -> list[str]:
    return [
        "run", "--protocol", "base2new", "--method", method, "--datasets", DATASET, "--seeds", "1",
        "--model", "vlp-world", "--out", str(runs), "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> tuple[Path, str]:
    runs = tmp_path_factory.mktemp("runs")
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(_grid(runs, "zeroshot", "--dry-run")) == 0
        assert main(_grid(runs, "zeroshot,coop", "--shots", "1", "--epochs", "1")) == 0
    return runs, buf.getvalue()


def test_zero_shot_is_planned_and_evaluated_inside_a_grid(grid) -> None:
    runs, out = grid
    assert "todo" in out and "zeroshot" in out
    zs = runs / "base2new" / "zeroshot" / DATASET / "shots1_seed1"
    assert (zs / "done").is_file()
    evals = {e["subsample"]: e for e in json.loads((zs / "metrics.json").read_text())["evaluations"]}
    assert set(evals) == {"base", "new"}
    assert (evals["base"]["n"], evals["new"]["n"]) == (4 * 20, 4 * 20)  # every test image of each half
    assert evals["base"]["accuracy"] > 3 * 100 / 4  # 3x chance: the pretrained backbone, untouched
    assert "learned_nothing" not in json.loads((zs / "metrics.json").read_text())


def test_zero_step_run_says_it_learned_nothing(grid) -> None:
    runs, out = grid
    coop = runs / "base2new" / "coop" / DATASET / "shots1_seed1"
    line = json.loads((coop / "metrics.json").read_text())["learned_nothing"]
    assert line.startswith("learned little: only 0 optimiser steps") and "--epochs" in line
    assert f"warning: base2new/coop/{DATASET}/shots1_seed1: learned little" in out  # the grid summary


def test_report_has_the_zero_shot_row_first_and_the_warning(grid) -> None:
    runs, _ = grid
    rep = build_report(runs, runs / "report")
    text = rep.markdown.read_text()
    assert "zero-shot CLIP Base" in text and text.index("zero-shot CLIP Base") < text.index("CoOp Base")
    assert "## Runs that learned nothing" in text and "learned little" in text
    assert "(None)" not in text and "vlp-world (bundled weights)" in text


def _coop(tmp_path: Path, lr: str) -> dict:
    runs = tmp_path / lr
    argv = _grid(runs, "coop", "--shots", "4", "--epochs", "8", "--set", "train.batch_size=4")
    assert main([*argv, "--set", f"train.lr={lr}"]) == 0
    return json.loads((runs / "base2new" / "coop" / DATASET / "shots4_seed1" / "metrics.json").read_text())


def test_a_run_that_learns_gives_no_warning_one_that_did_not_does(tmp_path) -> None:
    assert "learned_nothing" not in _coop(
        tmp_path, "1.0"
    )  # 28 steps after warm-up at lr 1.0: predictions move
    # a learning rate far too small for this backbone: 28 steps, every prediction still zero-shot's
    line = _coop(tmp_path, "1e-06")["learned_nothing"]
    assert line.startswith("learned nothing: predictions equal zero-shot CLIP's on all 80 test images")


def test_world_backbone_on_other_data_gets_a_banner(tmp_path, capfd) -> None:
    from vlprompt.run.backbone import WORLD_BANNER

    argv = ["run", "--protocol", "base2new", "--method", "zeroshot", "--datasets", "demo", "--seeds", "1"]
    assert main([*argv, "--model", "vlp-world", "--out", str(tmp_path), "--no-progress"]) == 0
    out, err = capfd.readouterr()
    assert WORLD_BANNER in out + err
    text = build_report(tmp_path, tmp_path / "report").markdown.read_text()
    assert WORLD_BANNER in text
    # eval says it too: zero-shot with --method, and a world run evaluated on other data with --run
    assert main(["eval", "--method", "zeroshot", "--dataset", "demo", "--model", "vlp-world"]) == 0
    assert WORLD_BANNER in "".join(capfd.readouterr())
    run = next(tmp_path.rglob("done")).parent
    assert main(["eval", "--run", str(run), "--dataset", "demo", "--subsample", "all"]) == 0
    assert WORLD_BANNER in "".join(capfd.readouterr())


def test_world_bench_clamps_depths_and_last_blocks_to_the_model() -> None:
    """The world bench's one adaptation: a depth or last block beyond the model's 9 layers becomes 9."""
    from vlprompt.cli.world_bench import clamp_depths

    assert clamp_depths("ivlp", "base2new", 9) == ["options.depth_image=9", "options.depth_text=9"]
    assert clamp_depths("mma", "base2new", 9) == ["options.adapter_end=9"]
    assert clamp_depths("coop", "base2new", 9) == [] and clamp_depths("maple", "base2new", 9) == []
