"""Files a command writes and counts it takes are checked when the command line is read: one line,
before any work (an unknown image type, a folder or a count below 1 ended in tracebacks)."""

from __future__ import annotations

import pytest

from vlprompt.cli.common import output_file
from vlprompt.cli.main import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["world", "samples", "--out", "s.xyz"], "argument --out: cannot write '.xyz' files here; use .png"),
        (["world", "samples", "--out", "{tmp}"], "is a folder; give a file name such as"),
        (["world", "samples", "--out", "s.png", "--n", "-3"], "argument --n: '-3' is not an integer >= 1"),
        (["world", "samples", "--out", "s.png", "--n", "0"], "argument --n: '0' is not an integer >= 1"),
        (["world", "pretrain", "--steps", "0", "--out", "w.safetensors"], "'0' is not an integer >= 1"),
        (["inspect", "--method", "coop", "--figure", "f.xyz", "a.png"], "cannot write '.xyz' files here"),
        (["inspect", "--method", "coop", "--json", "{tmp}", "a.png"], "is a folder"),
        (["report", "{tmp}", "--out", "{file}"], "argument --out: {file} is a file; give a folder"),
        (
            ["eval", "--method", "zeroshot", "--dataset", "demo", "--out", "{file}"],
            "is a file; give a folder",
        ),
        (
            ["run", "--protocol", "base2new", "--method", "coop", "--out", "{file}"],
            "is a file; give a folder",
        ),
    ],
)
def test_bad_output_files_and_counts_are_one_line(argv, message, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{file}", str(afile)) for a in argv]
    message = message.replace("{file}", str(afile))
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == [
        "afile"
    ] and afile.read_text() == "mine"  # nothing written


def test_a_name_without_a_suffix_gets_the_one_written(tmp_path):
    assert output_file(".png", ".pdf")(str(tmp_path / "fig")) == tmp_path / "fig.png"
    assert output_file(".png", ".pdf")(str(tmp_path / "fig.PDF")) == tmp_path / "fig.PDF"
