"""End to end on the demo data set with vlp-tiny: train, eval, predict, export, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlprompt.cli.main import main  # noqa: E402
from vlprompt.data.images import DEFAULT_MAX_IMAGE_PIXELS, set_max_image_pixels

RUN_FILES = [
    "config.yaml",
    "env.json",
    "split.json",
    "metrics.json",
    "log.jsonl",
    "log.csv",
    "prompt.safetensors",
    "manifest.json",
    "checkpoint/last.safetensors",
    "checkpoint/state.json",
    "fingerprint.json",
    "done",
]
TRAIN = [
    "train",
    "--method",
    "tinyctx",
    "--dataset",
    "demo",
    "--shots",
    "2",
    "--protocol",
    "base2new",
    "--model",
    "vlp-tiny",
    "--epochs",
    "2",
    "--no-progress",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.lr=0.01",
]


pytestmark = pytest.mark.usefixtures("tinyctx")  # the test-only method, for every test here


@pytest.fixture(scope="module")
def run(tmp_path_factory, tinyctx) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


def test_train_writes_run_dir(run: Path, capsys) -> None:
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())["evaluations"]
    assert len(metrics) == 1
    e = metrics[0]
    assert (e["dataset"], e["subsample"], e["split"], e["epoch"], e["n_classes"]) == (
        "demo",
        "base",
        "test",
        2,
        5,
    )
    assert e["n"] == sum(json.loads((run / "split.json").read_text())["counts"]["test"] for _ in [0])
    assert set(e["per_class_accuracy"]) == {"zero", "one", "two", "three", "four"}
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["classnames"] == ["zero", "one", "two", "three", "four"]
    assert manifest["trainable_parameters"] == 2 * 128 and manifest["backbone"]["name"] == "vlp-tiny"
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == 10 and len(split["split_hash"]) == 64
    steps = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert {s["kind"] for s in steps} == {"step", "epoch"} and steps[-1]["epoch"] == 2
    # a complete run is not retrained
    mtime = (run / "prompt.safetensors").stat().st_mtime_ns
    assert main([*TRAIN, "--out", str(run)]) == 0
    assert "already complete" in capsys.readouterr().out
    assert (run / "prompt.safetensors").stat().st_mtime_ns == mtime


def test_eval_run_on_new_classes(run: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--subsample", "new"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "new" in out and "accuracy" in out
    evals = json.loads((run / "metrics.json").read_text())["evaluations"]
    assert [e["subsample"] for e in evals] == ["base", "new"]
    assert set(evals[1]["per_class_accuracy"]) == {"five", "six", "seven", "eight", "nine"}
    # recording the same (dataset, subsample) again replaces its entry instead of duplicating it
    from vlprompt.run import RunDir

    RunDir(run).write_metrics({**evals[1], "accuracy": -1.0})
    evals2 = json.loads((run / "metrics.json").read_text())["evaluations"]
    assert [(e["subsample"], e["accuracy"]) for e in evals2] == [
        ("base", evals[0]["accuracy"]),
        ("new", -1.0),
    ]
    RunDir(run).write_metrics(evals[1])


def _demo_image(run: Path) -> Path:
    from vlprompt.data import get_dataset

    rel = json.loads((run / "split.json").read_text())["train"][0]
    return Path(get_dataset("demo").image_dir) / rel


def test_predict_topk(run: Path, capsys) -> None:
    img = _demo_image(run)
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--topk", "3", str(img)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(img) and len(lines) == 4
    probs = [float(x.split()[0]) for x in lines[1:]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert all(x.split(None, 1)[1] in {"zero", "one", "two", "three", "four"} for x in lines[1:])
    assert main(["predict", "--run", str(run), "--classes", "cat, dog", str(img)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and {x.split(None, 1)[1] for x in lines[1:]} == {"cat", "dog"}
    assert sum(float(x.split()[0]) for x in lines[1:]) == pytest.approx(1.0, abs=1e-4)


def test_export_roundtrip(run: Path, tmp_path: Path) -> None:
    from vlprompt import load_prompt as load_run

    assert main(["export", str(run), str(tmp_path / "exp")]) == 0
    a = load_run(run, device="cpu")
    b = load_run(tmp_path / "exp", backbone=a.backbone)
    c = load_run(tmp_path / "exp" / "prompt.safetensors", backbone=a.backbone)  # manifest is embedded too
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        la, lb, lc = a(x), b(x), c(x)
    assert la.shape == (2, 5)
    assert torch.equal(la, lb) and torch.equal(la, lc)
    assert all(torch.equal(a.prompt_state_dict()[k], b.prompt_state_dict()[k]) for k in a.prompt_state_dict())


def _one_line_error(capsys, argv: list[str], *needles: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error: "), err
    for n in needles:
        assert n in err[-1]


def test_bad_inputs_one_line_errors(run: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "half"
    empty.mkdir()
    (empty / "config.yaml").write_text("method: tinyctx\n")
    _one_line_error(capsys, ["eval", "--run", str(empty)], "prompt.safetensors")
    _one_line_error(capsys, ["eval", "--run", str(tmp_path / "nope")], "run not found")
    (tmp_path / "afile.txt").write_text("x")
    _one_line_error(capsys, ["eval", "--run", str(tmp_path / "afile.txt")], "is a file, not a run")
    _one_line_error(
        capsys,
        ["train", "--method", "copp", "--dataset", "demo", "--out", str(tmp_path / "x")],
        "unknown method",
    )
    _one_line_error(
        capsys, [*TRAIN, "--set", "trian.lr=1", "--out", str(tmp_path / "y")], "unknown section 'trian'"
    )
    _one_line_error(capsys, [*TRAIN, "--set", "train.lr", "--out", str(tmp_path / "y")], "KEY=VALUE")
    _one_line_error(capsys, ["predict", "--run", str(run), str(tmp_path / "missing.png")], "missing.png")
    _one_line_error(
        capsys, ["eval", "--method", "tinyctx", "--dataset", "demo", "--model", "vlp-tiny"], "train it first"
    )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_flags_a_run_would_ignore_are_refused(run: Path, capsys) -> None:
    """A run names its own method and backbone: --model (without the --weights it describes), or a
    fresh-prompt flag beside --run, is refused instead of being silently ignored."""
    _one_line_error(capsys, ["predict", "--run", str(run), "--model", "nosuch", "a.png"], "drop --model")
    _one_line_error(capsys, ["eval", "--run", str(run), "--model", "nosuch"], "--model applies to --method")
    _one_line_error(capsys, ["inspect", "--run", str(run), "--method", "mpl", "a.png"], "--method describe")
    _one_line_error(
        capsys, ["inspect", "--run", str(run), "--model", "vlp-tiny", "a.png"], "--model describe"
    )


def test_predict_takes_the_pixel_limit_its_error_names(run: Path, tmp_path: Path, capsys) -> None:
    """An image over the decompression-bomb limit is refused naming a flag predict has."""
    big = tmp_path / "big.png"
    Image.new("RGB", (120, 100), (10, 200, 30)).save(big)
    argv = ["predict", "--run", str(run), "--format", "json", str(big)]
    _one_line_error(capsys, [*argv, "--max-image-pixels", "5000"], "predict: --max-image-pixels N")
    try:
        assert main([*argv, "--max-image-pixels", "0"]) == 0  # no limit
        assert json.loads(capsys.readouterr().out)[0]["image"].endswith("big.png")
    finally:
        set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)
