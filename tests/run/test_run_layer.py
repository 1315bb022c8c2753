"""The run layer: typed config, fingerprints, locks, no pickles, portable files, one-line errors."""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlprompt.cli.main import main  # noqa: E402
from vlprompt.errors import VlpromptError  # noqa: E402
from vlprompt.run import RunDir, RunLock  # noqa: E402
from vlprompt.train.config import RunConfig, describe_keys, resolve_config  # noqa: E402

BASE = [
    "--method",
    "tinyctx",
    "--dataset",
    "demo",
    "--shots",
    "2",
    "--model",
    "vlp-tiny",
    "--no-progress",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.lr=0.01",
]


pytestmark = pytest.mark.usefixtures("tinyctx")  # the test-only method, for every test here


def train(out: Path, *extra: str) -> int:
    return main(["train", *BASE, "--epochs", "1", "--out", str(out), *extra])


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("error:")]
    assert errors, err
    return errors[-1]


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, tinyctx) -> Path:
    out = tmp_path_factory.mktemp("runs") / "r"
    assert train(out) == 0
    return out


# ------------------------------------------------------------------ typed configuration
def test_every_key_has_type_default_and_help():
    rows = describe_keys("coop")
    keys = {r["key"] for r in rows}
    assert {"train.lr", "train.image_features_cache", "data.max_image_pixels", "options.n_ctx"} <= keys
    assert all(r["help"] for r in rows), [r["key"] for r in rows if not r["help"]]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("options.n_ctx=abc", "options.n_ctx='abc' is invalid; it must be an integer"),
        ("train.epochs_by_shots=foo", "train.epochs_by_shots='foo' is invalid; it must be a mapping"),
        ("train.lr=.inf", "train.lr=inf is invalid; it must be a finite number"),
        ("train.lr=-1", "train.lr=-1 is invalid; it must be a number > 0 and <= 10"),
        ("train.batch_size=2.5", "train.batch_size=2.5 is invalid; it must be an integer"),
        ("train.precision=fp8", "choose one of: auto, fp32, bf16, fp16"),
        ("data.shots=-1", "data.shots=-1 is invalid; it must be an integer >= 0"),
        ("train.lrr=1", "unknown train key 'lrr'"),
    ],
)
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(VlpromptError) as e:
        resolve_config("coop", "demo", model="vlp-tiny", overrides=[override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_readme_feature_cache_key_and_number_spellings():
    cfg = resolve_config("coop", "demo", overrides=["train.image_features_cache=train", "train.lr=1e-3"])
    assert cfg.train.image_features_cache == "train" and cfg.train.lr == pytest.approx(1e-3)
    assert isinstance(cfg, RunConfig) and cfg.options.n_ctx == 16


def test_config_file_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.5\n  epochs: 7\noptions:\n  n_ctx: 4\n")
    cfg = resolve_config("coop", "demo", shots=2, config_file=f, overrides=["train.lr=0.25"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.options.n_ctx) == (
        0.25,
        7,
        4,
    )  # file epochs beat epochs_by_shots
    f.write_text("train:\n  lrr: 1\n")
    with pytest.raises(VlpromptError, match="unknown train key 'lrr'"):
        resolve_config("coop", "demo", config_file=f)
    f.write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(VlpromptError, match="not valid YAML"):
        resolve_config("coop", "demo", config_file=f)


def test_config_show(capsys):
    assert main(["config", "show", "--method", "coop", "--set", "train.lr=0.5"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("train.lr "))
    assert "0.5" in line and "0.002" in line and line.endswith("*")
    assert any(ln.startswith("options.n_ctx ") for ln in out.splitlines())


# ------------------------------------------------------------------ identity
def test_complete_run_with_other_settings_is_refused(done_run, capsys):
    before = (done_run / "config.yaml").read_text()
    assert train(done_run, "--shots", "1") == 2  # argparse: the last --shots wins
    err = last_error(capsys)
    assert "holds a complete run with other settings" in err and "data.shots: 2 -> 1" in err
    assert main(["train", *BASE, "--epochs", "2", "--out", str(done_run)]) == 2
    assert "train.epochs: 1 -> 2" in last_error(capsys)
    assert main(["train", *BASE, "--epochs", "1", "--seed", "3", "--out", str(done_run)]) == 2
    assert "data.seed: 1 -> 3" in last_error(capsys)
    assert (done_run / "config.yaml").read_text() == before  # nothing was written
    assert train(done_run) == 0  # the same request reuses it
    assert "already complete with these settings" in capsys.readouterr().out


def test_force_replaces_a_differing_run(tmp_path, capsys):
    out = tmp_path / "r"
    assert train(out) == 0
    assert main(["train", *BASE, "--epochs", "2", "--out", str(out), "--force"]) == 0
    assert json.loads((out / "manifest.json").read_text())["epochs"] == 2


def test_grid_skips_only_equal_fingerprints(tmp_path, capsys):
    grid = [
        "run",
        "--protocol",
        "base2new",
        "--method",
        "tinyctx",
        "--datasets",
        "demo",
        "--seeds",
        "1",
        "--shots",
        "2",
        "--model",
        "vlp-tiny",
        "--epochs",
        "1",
        "--out",
        str(tmp_path),
        "--no-progress",
        "--set",
        "train.batch_size=4",
    ]
    assert main(grid) == 0
    capsys.readouterr()
    assert main([*grid, "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("complete")
    changed = [*grid[:-1], "train.batch_size=8"]
    assert main([*changed, "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("conflict") and "train.batch_size: 4 -> 8" in out
    assert main(changed) == 1  # refused, not silently reused
    assert "other settings" in capsys.readouterr().out
    # the refusal leaves the finished run as it was: no failed.json, so reports keep it
    assert not list(tmp_path.rglob("failed.json"))
    (next(tmp_path.rglob("done")).parent / "failed.json").write_text('{"error": "stale"}')
    assert main([*grid, "--set", "options.n_ctx=abc", "--dry-run"]) == 2  # refused while planning
    assert "options.n_ctx='abc' is invalid" in last_error(capsys)
    assert main(grid) == 0
    assert "1 skipped" in capsys.readouterr().out
    assert not list(tmp_path.rglob("failed.json"))  # a complete run that is reused drops a stale record


def test_dry_run_finds_an_impossible_depth(tmp_path, capsys):
    args = [
        "run",
        "--protocol",
        "base2new",
        "--method",
        "maple",
        "--datasets",
        "demo",
        "--seeds",
        "1",
        "--model",
        "vlp-tiny",
        "--out",
        str(tmp_path),
        "--dry-run",
    ]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert out.startswith("invalid") and "depth" in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_interrupted_run_resume_with_other_epochs_writes_nothing(tmp_path, capsys):
    from vlprompt.run import train_run

    out = tmp_path / "r"
    cfg = resolve_config(
        "tinyctx",
        "demo",
        shots=2,
        model="vlp-tiny",
        epochs=3,
        overrides=["train.batch_size=4", "train.lr=0.01"],
    )
    assert train_run(cfg, out, progress=False, stop_after_epoch=1)["status"] == "stopped"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["train", *BASE, "--epochs", "5", "--out", str(out), "--resume"]) == 2
    assert "interrupted run with other settings" in last_error(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# ------------------------------------------------------------------ no pickles
class _Payload:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_pickle_in_the_run_directory_never_runs(tmp_path, capsys):
    out = tmp_path / "r"
    cfg = resolve_config(
        "tinyctx",
        "demo",
        shots=2,
        model="vlp-tiny",
        epochs=2,
        overrides=["train.batch_size=4", "train.lr=0.01"],
    )
    from vlprompt.run import train_run

    train_run(cfg, out, progress=False, stop_after_epoch=1)
    ck = out / "checkpoint"
    for f in [ck / "state.json", *ck.glob("state-*.safetensors")]:
        f.unlink()
    marker = tmp_path / "pwned"
    with open(ck / "state.pt", "wb") as f:
        pickle.dump({"x": _Payload(marker)}, f)
    assert main(["train", *BASE, "--epochs", "2", "--out", str(out), "--resume"]) == 2
    assert "never loaded" in last_error(capsys)
    grid = ["run", "--protocol", "base2new", "--method", "tinyctx", "--datasets", "demo", "--seeds", "1"]
    main([*grid, "--shots", "2", "--model", "vlp-tiny", "--out", str(tmp_path / "g"), "--dry-run"])
    capsys.readouterr()
    assert not marker.exists()
    assert (ck / "state.pt").is_file()  # left alone: never opened, never deleted


def test_checkpoint_is_safetensors_and_json(done_run):
    ck = done_run / "checkpoint"
    head = json.loads((ck / "state.json").read_text())
    names = sorted(p.name for p in ck.iterdir())
    assert names == sorted(["last.safetensors", "state.json", head["tensors"]])
    assert head["format_version"] == 2 and "optimizer" in head["state"]
    assert not any(b"\x80" in p.read_bytes()[:2] for p in ck.iterdir())  # no pickle protocol header


# ------------------------------------------------------------------ concurrency
def test_second_writer_gets_the_holders_pid(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    code = (
        "import sys,time; from vlprompt.run import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train(out) == 2
        err = last_error(capsys)
        assert f"being written by pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    assert train(out) == 0  # a dead holder's lock is gone with it


def test_stale_temp_files_are_removed(tmp_path):
    out = tmp_path / "r"
    assert train(out) == 0
    stale = out / ".metrics.json.abc123.tmp"
    stale.write_text("half")
    (out / "checkpoint" / ".state.json.x.tmp").write_text("half")
    assert train(out, "--force") == 0
    assert not stale.exists() and not list((out / "checkpoint").glob(".*.tmp"))


# ------------------------------------------------------------------ numerical guard
def test_diverging_run_stops_without_results(tmp_path, capsys, monkeypatch, tinyctx):
    # train.lr is bounded (<= 10), so the divergence is made by the objective: a loss that is not finite
    ce = tinyctx.objective

    def diverging(self, out, labels):
        loss, terms = ce(self, out, labels)
        return loss * float("inf"), terms

    monkeypatch.setattr(tinyctx, "objective", diverging)
    out = tmp_path / "r"
    assert main(["train", *BASE, "--epochs", "2", "--out", str(out)]) == 2
    err = last_error(capsys)
    assert re.search(r"training diverged at epoch 1, step 1: the loss became", err), err
    assert "lower train.lr (now 1e-05)" in err
    assert not (out / "done").exists() and not (out / "metrics.json").exists()
    assert not (out / "prompt.safetensors").exists()


# ------------------------------------------------------------------ former tracebacks
def test_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(*a, **k):
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert train(tmp_path / "r") == 2
    err = last_error(capsys)
    assert "No space left" in err or "cannot write" in err


def test_crafted_config_yaml_in_eval(done_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(done_run, run)
    marker = tmp_path / "pwned"
    (run / "config.yaml").write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["eval", "--run", str(run)]) == 2
    assert "not valid YAML" in last_error(capsys)
    assert not marker.exists()


def _folder(root: Path, classes: list[str], n: int = 4) -> Path:
    from PIL import Image

    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            Image.new("RGB", (8, 8), (i * 40, j * 30, 90)).save(root / c / f"{j}.png")
    return root


def test_decompression_bomb(tmp_path, capsys):
    from PIL import Image

    root = _folder(tmp_path / "imgs", ["a", "b", "c"], 6)
    Image.new("1", (15000, 15000)).save(root / "a" / "9.png")
    args = [
        "train",
        "--method",
        "tinyctx",
        "--dataset",
        f"folder:{root}",
        "--model",
        "vlp-tiny",
        "--shots",
        "2",
        "--epochs",
        "1",
        "--no-progress",
        "--set",
        "train.batch_size=2",
    ]
    rc = main([*args, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc in (0, 2)
    if rc == 2:
        assert "too large to decode safely" in err and "Traceback" not in err
    assert main([*args, "--out", str(tmp_path / "r2"), "--skip-bad"]) == 0
    assert "too large to decode safely" in capsys.readouterr().err


def test_folder_that_gains_a_class_is_resplit(tmp_path, caplog):
    from vlprompt.data import get_dataset

    root = _folder(tmp_path / "imgs", ["a", "b"])
    assert len(get_dataset(f"folder:{root}").classnames) == 2
    _folder(root, ["c"])
    with caplog.at_level("WARNING"):
        assert len(get_dataset(f"folder:{root}").classnames) == 3
    assert "changed since its split" in caplog.text


# ------------------------------------------------------------------ portable, shareable files
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_honour_the_umask(tmp_path, umask):
    from vlprompt.utils import atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o666 & ~umask


def test_no_hostname_and_no_paths_in_shared_files(done_run, tmp_path):
    import socket

    env = json.loads((done_run / "env.json").read_text())
    assert "hostname" not in env and socket.gethostname() not in json.dumps(env)
    out = tmp_path / "export"
    assert main(["export", str(done_run), str(out)]) == 0
    for f in out.iterdir():
        assert str(tmp_path.parent) not in f.read_text(errors="ignore"), f


def test_prompt_predicted_with_weights_from_another_folder(tmp_path, capsys):
    import vlprompt

    bb = vlprompt.load_backbone("vlp-tiny")
    wa = tmp_path / "a" / "tiny.safetensors"
    wa.parent.mkdir()
    bb.save_safetensors(str(wa))
    out = tmp_path / "r"
    args = [a for a in BASE if a not in ("--model", "vlp-tiny")]
    assert main(["train", *args, "--epochs", "1", "--weights", str(wa), "--out", str(out)]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert (
        man["backbone"]["weights_file"] == "tiny.safetensors" and len(man["backbone"]["weights_sha256"]) == 64
    )
    assert str(tmp_path) not in json.dumps(man)
    exp = tmp_path / "shared_prompt"
    assert main(["export", str(out), str(exp)]) == 0
    wb = tmp_path / "b" / "tiny.safetensors"
    wb.parent.mkdir()
    wa.rename(wb)
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(img)
    assert main(["predict", "--run", str(exp), str(img), "--classes", "red,blue"]) == 2
    assert "pass --weights PATH" in last_error(capsys)
    m = vlprompt.load_prompt(exp, weights=str(wb))
    probs, _ = m.predict([str(img)], ["red", "blue"])
    assert probs.shape[-1] == 2 and torch.isfinite(probs).all()
    other = tmp_path / "other.safetensors"
    vlprompt.load_backbone("vlp-tiny", init_seed=5).save_safetensors(str(other))
    import logging

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("vlprompt").addHandler(handler)
    try:
        vlprompt.load_prompt(exp, weights=str(other))
    finally:
        logging.getLogger("vlprompt").removeHandler(handler)
    assert any("is not the weights file this prompt was trained with" in m for m in seen), seen


def test_refused_commands_leave_no_folder(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", *BASE, "--epochs", "1", "--out", str(out), "--set", "train.lr=-1"]) == 2
    assert main(["train", *BASE, "--epochs", "1", "--out", str(out), "--dataset", "nosuchset"]) == 2
    assert not out.exists()


def test_run_dir_api(done_run):
    run = RunDir(done_run)
    assert run.is_complete() and run.fingerprint()["fingerprint"]
    assert ("demo", "all") in run.recorded_evaluations()
    with RunLock(done_run):
        with RunLock(done_run):  # re-entrant in one process
            pass
    time.sleep(0)
