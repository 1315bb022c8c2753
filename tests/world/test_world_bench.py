"""The world bench's stand-ins: class descriptions for CoPrompt, a PromptSRC teacher for PromptKD."""

from __future__ import annotations

import json

import pytest
from open_clip.tokenizer import SimpleTokenizer

from vlprompt.cli.world_bench import TEACHER, _in_order, teacher_template
from vlprompt.data import read_descriptions
from vlprompt.protocols.grid import GridRequest, plan_grid
from vlprompt.run.identity import resolve_teacher
from vlprompt.train.config import RunRequest, resolve
from vlprompt.world.pretrain import world_token_ids
from vlprompt.world.sets import (
    CROSS_SOURCE,
    DG_SOURCE,
    DG_TARGETS,
    WORLD_SETS,
    class_descriptions,
    descriptions_file,
)


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


@pytest.mark.parametrize(
    ("protocol", "datasets", "source", "runs"),
    [
        ("base2new", ["world-shapes", "world-count"], None, 4),
        ("fewshot", ["world-shapes"], None, 10),
        ("dg", list(DG_TARGETS), DG_SOURCE, 2),
        ("cross-dataset", ["world-shapes", "world-count"], CROSS_SOURCE, 2),
    ],
)
def test_each_student_run_of_one_grid_gets_the_teacher_run_of_its_data_set_shots_and_seed(
    tmp_path, protocol, datasets, source, runs
) -> None:
    """The students of a protocol are one grid (so --jobs runs them side by side, not one at a time)."""

    def plan(method: str, overrides: tuple[str, ...] = ()) -> list:
        run = RunRequest(method, model="vlp-world", overrides=overrides)
        return plan_grid(GridRequest(protocol, [method], datasets, [1, 2], tmp_path, source=source, run=run))

    teachers = {(s.dataset, s.shots, s.seed): s.out_dir for s in plan(TEACHER)}
    template = json.dumps(teacher_template(protocol, str(tmp_path)))
    students = plan("promptkd", (f"options.teacher={template}",))
    assert len(students) == len(teachers) == runs
    for s in students:
        teacher = resolve_teacher(s.cfg).options.teacher
        assert teacher == str(teachers[s.dataset, s.shots, s.seed]), (s.name, teacher)
    assert {s.shots for s in students} == ({1, 2, 4, 8, 16} if protocol == "fewshot" else {16})


def test_a_teacher_path_takes_the_runs_data_set_shots_and_seed() -> None:
    cfg = resolve(
        RunRequest(
            "promptkd",
            dataset="world-count",
            shots=4,
            seed=3,
            model="vlp-world",
            overrides=('options.teacher="t/{dataset}/k{shots}/s{seed}/{dataset}"',),
        )
    )
    assert resolve_teacher(cfg).options.teacher == "t/world-count/k4/s3/world-count"
    assert resolve_teacher(cfg.but(options={"teacher": "t/fixed"})).options.teacher == "t/fixed"


@pytest.fixture
def bench(monkeypatch):
    """``bench(methods, seeds)`` runs ``run_bench`` with ``run`` and the report stubbed; returns the
    ``run`` argument lists it made and the runs directories it reported on."""
    import argparse

    import vlprompt.cli.main as cli_main
    import vlprompt.protocols.report as report_mod
    from vlprompt.cli.world_bench import run_bench

    calls: list[list[str]] = []
    built: list[str] = []
    monkeypatch.setattr(cli_main, "main", lambda argv: calls.append(argv) or 0)
    monkeypatch.setattr(
        report_mod, "build_report", lambda out, dest: built.append(out) or argparse.Namespace(markdown="r.md")
    )

    def run(out, methods: str, seeds: str) -> tuple[list[list[str]], list[str]]:
        args = argparse.Namespace(methods=methods, datasets="world-shapes", seeds=seeds, out=str(out), jobs=2,
                                  protocol="base2new", dry_run=False)  # fmt: skip
        assert run_bench(args) == 0
        return calls, built

    return run


def test_the_bench_writes_one_report_at_the_end_not_one_per_grid(tmp_path, bench) -> None:
    """Each grid's report re-read and re-plotted every run of the bench: minutes per grid, 25 grids."""
    calls, built = bench(tmp_path, "coop", "1")
    assert [a[a.index("--method") + 1] for a in calls] == ["zeroshot,coop"]
    assert all("--no-report" in a for a in calls) and built == [str(tmp_path)]


def test_methods_without_arguments_of_their_own_share_one_grid(tmp_path, bench) -> None:
    """A grid per method left a core idle at the end of each of ~25 grids, and started its workers again."""
    calls, _ = bench(tmp_path, "coop,ivlp,coprompt,kgcoop,promptkd", "1,2")
    grids = [a[a.index("--method") + 1] for a in calls]
    assert grids == ["zeroshot,coop", "ivlp", "coprompt", "kgcoop,promptsrc", "promptkd"]
    by = dict(zip(grids, calls, strict=True))
    assert "options.depth_image=9" in by["ivlp"] and "--descriptions" in by["coprompt"]
    assert not any(a in by["kgcoop,promptsrc"] for a in ("--set", "--descriptions"))
    assert any(a.startswith("options.teacher=") for a in by["promptkd"])
    assert all(a[a.index("--seeds") + 1] == "1,2" for a in calls)
