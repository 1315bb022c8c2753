"""`vlprompt data list|verify` via the CLI entry point."""

from __future__ import annotations

from vlprompt.cli.main import main


def test_data_list(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "caltech101" in out and "imagenet_r" in out and "4,128 / 1,649 / 2,465" in out


def test_data_verify_missing_images(shared_data, capsys):
    assert main(["data", "verify", "--dataset", "oxford_pets", "--root", str(shared_data)]) == 1
    out = capsys.readouterr().out
    assert "7,349 of 7,349 images listed in split_zhou_OxfordPets.json are missing" in out
    assert "robots.ox.ac.uk" in out


def test_data_verify_ok_and_user_errors(shared_data, tmp_path, capsys):
    assert main(["data", "verify", "--dataset", "caltech101", "--root", str(shared_data)]) == 0
    assert main(["data", "verify", "--dataset", "nope", "--root", str(tmp_path)]) == 2
    assert "unknown data set 'nope'" in capsys.readouterr().err
    assert main(["data", "verify", "--dataset", "dtd", "--root", str(tmp_path / "x")]) == 1


def test_data_verify_names_an_unknown_data_set_before_asking_for_a_root(capsys):
    assert main(["data", "verify", "--dataset", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown data set 'nosuch'" in err and "--root" not in err
    assert main(["data", "verify", "--dataset", "caltech101"]) == 2
    assert "data verify needs --root DIR" in capsys.readouterr().err
