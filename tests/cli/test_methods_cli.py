"""`vlprompt methods --count`: every registered method, with its count on the backbone or why none."""

from __future__ import annotations

from vlprompt.cli.main import main
from vlprompt.methods import list_methods


def test_count_lists_every_method_and_says_which_presets_do_not_fit(capsys):
    assert main(["methods", "--count", "--model", "vlp-world"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    assert set(lines) == set(list_methods())  # it stopped at the first preset that did not fit
    assert "[1,024 trainable parameters on vlp-world]" in lines["coop"]
    assert "its preset does not fit vlp-world: prompt depth 12 is outside [1, 9]" in lines["vpt"]


def test_demo_refuses_an_unknown_model_before_it_plans(capsys):
    assert main(["demo", "--model", "nosuch", "--out", "never"]) == 2
    captured = capsys.readouterr()
    assert "unknown model 'nosuch'" in captured.err and "(`vlprompt models` lists them all)" in captured.err
    assert "backbone:" not in captured.out  # no banner, no plan, no run
