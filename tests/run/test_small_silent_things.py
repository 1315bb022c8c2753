"""Issue 25 item 6: the small silent things a new user met, each now said (or fixed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vlprompt
from vlprompt.cli.main import main
from vlprompt.errors import VlpromptError
from vlprompt.run.lock import RunLock

TINY = ["--model", "vlp-tiny", "--epochs", "1", "--set", "train.batch_size=8", "--no-progress"]


def _one_line(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("generated the ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_shots_beyond_the_data_set_are_refused_and_leave_nothing(tmp_path, capsys):
    """world-colour-shape has 20 training images per class: --shots 100 is refused, not silently 20."""
    out = tmp_path / "runs" / "coop_shots100"
    rc = main(["train", "--method", "coop", "--dataset", "world-colour-shape", "--shots", "100",
               "--model", "vlp-world", "--out", str(out), "--no-progress"])  # fmt: skip
    err = _one_line(capsys)
    assert rc == 2 and "--shots 100" in err and "at most 20" in err and "--shots 20" in err
    assert not (tmp_path / "runs").exists()


def test_refused_options_leave_no_half_made_run(tmp_path, capsys):
    """depth 12 on a 4-layer model: one line, and no run folder (no config.yaml, env.json ...)."""
    out = tmp_path / "maple_d12"
    rc = main(["train", "--method", "maple", "--dataset", "demo", "--shots", "2", "--out", str(out),
               "--set", "options.depth=12", *TINY])  # fmt: skip
    err = _one_line(capsys)
    assert rc == 2 and "depth" in err
    assert not out.exists()


def test_lock_released_and_removed_after_a_run(tmp_path, capsys):
    out = tmp_path / "coop"
    assert (
        main(["train", "--method", "coop", "--dataset", "demo", "--shots", "1", "--out", str(out), *TINY])
        == 0
    )
    assert (out / "prompt.safetensors").is_file() and not (out / ".lock").exists()


def test_run_lock_removes_its_file_and_still_excludes(tmp_path):
    lock = RunLock(tmp_path).acquire()
    assert (tmp_path / ".lock").is_file()
    import subprocess
    import sys

    code = f"from vlprompt.run.lock import RunLock; RunLock({str(tmp_path)!r}).acquire()"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert other.returncode != 0 and "is being written by pid" in other.stderr
    lock.release()
    assert not (tmp_path / ".lock").exists()
    with RunLock(tmp_path):  # taken again at once
        assert (tmp_path / ".lock").is_file()
    assert not (tmp_path / ".lock").exists()


def test_data_list_rows_are_aligned(capsys):
    assert main(["data", "list"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if not x.startswith("also:")]
    # the classes column is right-aligned: every row's count ends where the header's "classes" ends
    end = lines[0].index("classes") + len("classes")
    for line in lines[1:]:
        assert line[end - 1].isdigit() and line[end] == " ", line
    titles = {line.index(line.split()[1]) for line in lines}  # the world sets' long names included
    assert len(titles) == 1


def test_load_prompt_on_a_grid_folder_points_at_one_run(tmp_path):
    run = tmp_path / "runs" / "base2new" / "coop" / "demo" / "shots1_seed1"
    rc = main(["train", "--method", "coop", "--dataset", "demo", "--shots", "1", "--out", str(run), *TINY])
    assert rc == 0
    with pytest.raises(VlpromptError) as e:
        vlprompt.load_prompt(tmp_path / "runs")
    msg = str(e.value)
    assert "folder of 1 run(s)" in msg and str(run) in msg and "--resume" not in msg
    unfinished = tmp_path / "half"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("method: coop\n")
    with pytest.raises(VlpromptError, match="did not finish.*--resume"):
        vlprompt.load_prompt(unfinished)


def test_trainable_parameters_are_parameters_and_named_ones_have_names():
    bb = vlprompt.load_backbone("vlp-tiny")
    model = vlprompt.create_model("coop", bb, ["cat", "dog"])
    params = model.trainable_parameters()
    assert all(isinstance(p, torch.nn.Parameter) for p in params)
    assert sum(p.numel() for p in params) == model.num_trainable() == 16 * 128
    named = model.named_trainable_parameters()
    assert [n for n, _ in named] == ["ctx"] and named[0][1] is params[0]
    torch.optim.SGD(model.trainable_parameters(), lr=0.1)  # what torch and peft users write


def test_junk_checkpoint_is_named_as_such(tmp_path, capsys):
    junk = tmp_path / "model.pth.tar-5"
    torch.save({"state_dict": {174812789: torch.zeros(1)}}, junk)
    rc = main(["import", str(junk), "--classes", "a,b", "--model", "vlp-tiny", "--out", str(tmp_path / "o")])
    err = _one_line(capsys)
    assert rc == 2 and "is not a prompt checkpoint" in err and str(junk) in err
    assert not Path(tmp_path / "o").exists()
