"""The world bench's stand-ins: class descriptions for CoPrompt, a PromptSRC teacher for PromptKD."""

from __future__ import annotations

import json
from pathlib import Path

from open_clip.tokenizer import SimpleTokenizer

from vlprompt.cli.world_bench import TEACHER, _in_order, _teacher_runs
from vlprompt.data import read_descriptions
from vlprompt.world.pretrain import world_token_ids
from vlprompt.world.sets import WORLD_SETS, class_descriptions, descriptions_file


def test_descriptions_cover_every_world_class_in_trained_words(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VLPROMPT_HOME", str(tmp_path))
    tok = SimpleTokenizer(context_length=24)
    ids = set(world_token_ids(tok))
    desc = class_descriptions()
    for ws in WORLD_SETS.values():
        for name in ws.classnames:
            sentences = desc[name]
            assert len(sentences) >= 3 and ws.template.format(name) not in sentences, name
            for s in sentences:
                enc = tok.encode(s)
                assert set(enc) <= ids and len(enc) + 2 <= 24, s  # read in pretraining, no truncation
    path = descriptions_file()
    assert json.loads(path.read_text()) == desc
    sha = read_descriptions(path).sha256
    assert descriptions_file() == path and read_descriptions(path).sha256 == sha  # stable: one identity
    read_descriptions(path).for_classes(list(WORLD_SETS["world-count"].classnames))  # none missing


def test_the_teacher_runs_before_the_methods_that_distil_it() -> None:
    assert _in_order(["zeroshot", "coop", "promptkd", "promptsrc"]) == [
        "zeroshot",
        "coop",
        TEACHER,
        "promptkd",
    ]
    assert _in_order(["zeroshot", "promptkd"]) == ["zeroshot", TEACHER, "promptkd"]
    assert _in_order(["zeroshot", "coop", "kgcoop"]) == ["zeroshot", "coop", "kgcoop"]


def test_each_student_run_gets_the_teacher_run_of_its_data_set_shots_and_seed(tmp_path) -> None:
    runs = _teacher_runs("base2new", ["world-shapes", "world-count"], "1,2", str(tmp_path))
    assert len(runs) == 4
    for pick, teacher in runs:
        d, k, s = pick[pick.index("--datasets") + 1], pick[pick.index("--shots") + 1], pick[-1]
        assert pick[-2] == "--seeds" and k == "16"
        assert teacher == Path(tmp_path) / "base2new" / TEACHER / d / f"shots{k}_seed{s}"
    fs = _teacher_runs("fewshot", ["world-shapes"], "1", str(tmp_path))
    assert sorted(int(p[p.index("--shots") + 1]) for p, _ in fs) == [1, 2, 4, 8, 16]
    dg = _teacher_runs("dg", ["world-shapes"], "3", str(tmp_path))
    assert len(dg) == 1 and dg[0][0][:2] == ["--source", "world-shapes"]


def test_the_bench_writes_one_report_at_the_end_not_one_per_grid(tmp_path, monkeypatch) -> None:
    """Each grid's report re-read and re-plotted every run of the bench: minutes per grid, 25 grids."""
    import argparse

    import vlprompt.cli.main as cli_main
    import vlprompt.protocols.report as report_mod
    from vlprompt.cli.world_bench import run_bench

    calls: list[list[str]] = []
    monkeypatch.setattr(cli_main, "main", lambda argv: calls.append(argv) or 0)
    built: list[str] = []
    monkeypatch.setattr(
        report_mod, "build_report", lambda out, dest: built.append(out) or argparse.Namespace(markdown="r.md")
    )
    args = argparse.Namespace(methods="coop", datasets="world-shapes", seeds="1", out=str(tmp_path), jobs=2,
                              protocol="base2new", dry_run=False)  # fmt: skip
    assert run_bench(args) == 0
    assert [a[a.index("--method") + 1] for a in calls] == ["zeroshot", "coop"]
    assert all("--no-report" in a for a in calls) and built == [str(tmp_path)]
