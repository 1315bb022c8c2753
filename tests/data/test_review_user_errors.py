"""User errors found in a CLI review: each is one `error:` line with exit status 2, never a traceback."""

from __future__ import annotations

from data_helpers import class_folders

from vlprompt.cli.main import main

TRAIN = ["train", "--method", "coop", "--dataset", "demo", "--model", "vlp-tiny", "--epochs", "1"]


def test_verify_custom_folder_needs_no_root(tmp_path, capsys):
    root = class_folders(tmp_path / "imgs", {"cat": 6, "dog": 6})
    assert main(["data", "verify", "--dataset", f"folder:{root}", "--check-images"]) == 0
    assert "2 classes" in capsys.readouterr().out


def test_verify_missing_root_still_says_layout(tmp_path, capsys):
    assert main(["data", "verify", "--dataset", "caltech101", "--root", str(tmp_path / "x")]) == 1
    layout = [ln for ln in capsys.readouterr().out.splitlines() if "layout:" in ln]
    assert layout and "101_ObjectCategories" in layout[0]


def test_base_half_of_one_class_is_refused(tmp_path, capsys):
    root = class_folders(tmp_path / "imgs", {"cat": 6, "dog": 6})
    argv = ["train", "--method", "coop", "--dataset", f"folder:{root}", "--subsample", "base", "--shots", "2"]
    assert main([*argv, "--model", "vlp-tiny", "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    assert "half would have 1" in capsys.readouterr().err


def test_bad_numbers_and_paths_are_one_line(tmp_path, capsys):
    cases = [
        ([*TRAIN, "--seed", "-1", "--out", str(tmp_path / "a")], "data.seed=-1"),
        ([*TRAIN, "--num-workers", "-1", "--out", str(tmp_path / "b")], "data.num_workers=-1"),
        ([*TRAIN, "--out", "/proc/vlprompt-review/x"], "/proc/vlprompt-review"),
        (["eval", "--method", "zeroshot", "--dataset", "demo", "--batch-size", "0"], "--batch-size"),
        (["eval", "--method", "zeroshot", "--dataset", "demo", "--num-workers", "-2"], "--num-workers"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and needle in err, err
