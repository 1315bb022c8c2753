"""Issue 25 item 3: `vlprompt run` ends with the grid's table, as demo does."""

from __future__ import annotations

from fakeruns import demo_grid_argv, make_run

from vlprompt.cli.main import main
from vlprompt.protocols.report import grid_summary


def test_grid_summary_has_seed_means_hm_and_the_zero_shot_row(tmp_path):
    dirs = [
        make_run(tmp_path, "base2new", "coop", "caltech101", 16, s, {("caltech101", "base"): b,
                 ("caltech101", "new"): n})
        for s, (b, n) in enumerate([(90.0, 60.0), (94.0, 64.0)], start=1)
    ]  # fmt: skip
    dirs.append(make_run(tmp_path, "base2new", "zeroshot", "caltech101", 16, 1,
                         {("caltech101", "base"): 80.0, ("caltech101", "new"): 70.0}))  # fmt: skip
    text = grid_summary(dirs)
    lines = text.splitlines()
    assert "Method" in lines[1] and "HM" in lines[1]
    zs = next(line for line in lines if line.startswith("zero-shot CLIP"))
    coop = next(line for line in lines if line.startswith("CoOp"))
    assert lines.index(zs) < lines.index(coop)  # zero-shot first, as in the papers' tables
    assert "92.00 ± 2.00" in coop and "62.00 ± 2.00" in coop and f"{2 * 92 * 62 / 154:.2f}" in coop
    assert coop.split()[-1] == "2"  # seeds
    assert f"{2 * 80 * 70 / 150:.2f}" in zs


def test_run_command_prints_the_table(tmp_path, capsys):
    argv = demo_grid_argv(tmp_path / "runs", "1")
    argv.insert(argv.index("--seeds") + 2, "2")  # --seeds 1 2 (space-separated)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 runs: 2 done" in out
    table = out[out.index("Base-to-new (top-1 %") :].splitlines()
    row = next(line for line in table if line.startswith("CoOp"))
    assert "Demo" in row and "±" in row and row.split()[-1] == "2"
