"""Grid planning per protocol (counts, directories, evaluations, skip of complete runs) and the runner."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from fakeruns import make_run

from vlprompt.cli.main import main
from vlprompt.data import CROSS_DATASET_TARGETS, DG_TARGETS, FEWSHOT_K
from vlprompt.errors import VlpromptError
from vlprompt.protocols.grid import Evaluation, GridRequest, parse_list, plan_grid
from vlprompt.protocols.runner import execute, run_grid, summarize
from vlprompt.train.config import RunRequest


def test_base2new_plan(tmp_path: Path) -> None:
    specs = plan_grid(
        GridRequest("base2new", ["coop", "zeroshot"], ["caltech", "eurosat"], [1, 2, 3], tmp_path)
    )
    assert len(specs) == 2 * 2 * 3
    dirs = {s.out_dir for s in specs}
    assert len(dirs) == 12
    assert tmp_path / "base2new" / "coop" / "caltech101" / "shots16_seed2" in dirs
    s = specs[0]
    assert (s.method, s.dataset, s.shots, s.seed) == ("coop", "caltech101", 16, 1)
    assert s.evaluations == [Evaluation("caltech101", "base"), Evaluation("caltech101", "new")]
    assert s.cfg.data.subsample == "base" and s.cfg.protocol == "base2new"
    assert s.cfg.data.dataset == "caltech101" and s.cfg.data.seed == 1
    assert s.cfg.backbone.to_dict() == {"name": "ViT-B-16", "pretrained": None, "weights": None}


def test_fewshot_plan_default_shots(tmp_path: Path) -> None:
    specs = plan_grid(
        GridRequest(
            "fewshot",
            ["coop"],
            ["demo"],
            [1, 2],
            tmp_path,
            run=RunRequest("coop", epochs=3, overrides=("train.lr=0.01",)),
        )
    )
    assert len(specs) == len(FEWSHOT_K) * 2
    assert sorted({s.shots for s in specs}) == list(FEWSHOT_K)
    assert all(s.evaluations == [Evaluation("demo", "all")] for s in specs)
    assert all(s.cfg.data.subsample == "all" for s in specs)
    assert all(s.cfg.train.epochs == 3 and s.cfg.train.lr == 0.01 for s in specs)
    assert {s.out_dir.name for s in specs} == {f"shots{k}_seed{s}" for k in FEWSHOT_K for s in (1, 2)}


@pytest.mark.parametrize("protocol,targets", [("cross-dataset", CROSS_DATASET_TARGETS), ("dg", DG_TARGETS)])
def test_transfer_plans(tmp_path: Path, protocol: str, targets: tuple[str, ...]) -> None:
    specs = plan_grid(
        GridRequest(protocol, ["coop"], None, [1, 2, 3], tmp_path, run=RunRequest("coop", root="/data"))
    )
    assert len(specs) == 3  # one ImageNet run per seed; the targets are evaluations, not runs
    for s in specs:
        assert s.out_dir == tmp_path / protocol / "coop" / "imagenet" / f"shots16_seed{s.seed}"
        assert s.cfg.data.dataset == "imagenet" and s.cfg.data.subsample == "all"
        assert s.cfg.protocol == protocol and s.root == "/data"
        assert [e.dataset for e in s.evaluations] == ["imagenet", *targets]
        assert all(e.subsample == "all" for e in s.evaluations)
    assert len(targets) == (10 if protocol == "cross-dataset" else 4)
    # explicit targets
    specs = plan_grid(GridRequest(protocol, ["coop"], ["eurosat", "dtd"], [1], tmp_path))
    assert [e.dataset for e in specs[0].evaluations] == ["imagenet", "eurosat", "dtd"]


def test_plan_errors(tmp_path: Path) -> None:
    with pytest.raises(VlpromptError, match="unknown protocol"):
        plan_grid(GridRequest("b2n", ["coop"], ["demo"], [1], tmp_path))
    with pytest.raises(VlpromptError, match="needs --datasets"):
        plan_grid(GridRequest("base2new", ["coop"], None, [1], tmp_path))
    with pytest.raises(VlpromptError, match="unknown method"):
        plan_grid(GridRequest("base2new", ["coopp"], ["demo"], [1], tmp_path))
    with pytest.raises(VlpromptError, match="unknown data set"):
        plan_grid(GridRequest("fewshot", ["coop"], ["nosuchset"], [1], tmp_path))
    with pytest.raises(VlpromptError, match="bad seed 'x'"):
        parse_list("1,x", "seed", int)
    assert parse_list("1, 2,2,3", "seed", int) == [1, 2, 3]


def test_complete_runs_are_recognised(tmp_path: Path) -> None:
    specs = plan_grid(GridRequest("base2new", ["coop"], ["demo"], [1, 2, 3], tmp_path, shots=[2]))
    make_run(tmp_path, "base2new", "coop", "demo", 2, 1, {("demo", "base"): 50.0, ("demo", "new"): 40.0})
    make_run(tmp_path, "base2new", "coop", "demo", 2, 2, {("demo", "base"): 50.0})  # new eval missing
    make_run(
        tmp_path, "base2new", "coop", "demo", 2, 3, {("demo", "base"): 50.0, ("demo", "new"): 1.0}, done=False
    )
    assert [s.is_complete() for s in specs] == [True, False, False]
    assert specs[1].missing_evaluations() == [Evaluation("demo", "new")]


def _fake_runs_module(calls: list, fail_seed: int | None = None) -> types.ModuleType:
    """Stand-in for protocols/runs.py that writes the run-dir files the runner checks."""

    def train_run(cfg, out_dir, resume=True, progress=True, backbone=None, **kw):
        calls.append(("train", cfg.data.seed))
        if cfg.data.seed == fail_seed:
            raise RuntimeError("CUDA out of memory\nsecond line")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ds, sub = cfg.data.dataset, cfg.data.subsample
        entry = {"dataset": ds, "subsample": sub, "split": "test", "accuracy": 10.0 * cfg.data.seed}
        (out / "metrics.json").write_text(json.dumps({"evaluations": [entry]}))
        (out / "done").write_text("")
        return {}

    def evaluate_run(run_dir, dataset=None, root=None, subsample="new", backbone=None):
        calls.append(("eval", dataset, subsample))
        path = Path(run_dir) / "metrics.json"
        data = json.loads(path.read_text())
        entry = {"dataset": dataset, "subsample": subsample, "split": "test", "accuracy": 5.0}
        data["evaluations"].append(entry)
        path.write_text(json.dumps(data))
        return entry

    import vlprompt.run as real

    mod = types.ModuleType("vlprompt.run")
    mod.__dict__.update({k: v for k, v in vars(real).items() if not k.startswith("__")})
    mod.train_run, mod.evaluate_run = train_run, evaluate_run
    # the fake runs have no fingerprint: a finished one counts as computing exactly its spec
    mod.request_fingerprint = lambda cfg: {"fingerprint": "fake", "identity": {}}
    mod.check_request = lambda cfg, run, fp, **kw: "complete" if run.is_complete() else "fresh"
    return mod


def _install_fake_runs(monkeypatch, calls: list, fail_seed: int | None = None) -> None:
    """The fake run layer, both as ``vlprompt.run`` and in the runner's namespace (imported at its top)."""
    import vlprompt.protocols.runner as runner

    fake = _fake_runs_module(calls, fail_seed)
    monkeypatch.setitem(sys.modules, "vlprompt.run", fake)
    for name in ("train_run", "evaluate_run", "request_fingerprint", "check_request"):
        monkeypatch.setattr(runner, name, getattr(fake, name))


def test_runner_trains_evaluates_skips_and_survives_failure(tmp_path: Path, monkeypatch, caplog) -> None:
    calls: list = []
    _install_fake_runs(monkeypatch, calls, fail_seed=2)
    specs = plan_grid(GridRequest("base2new", ["coop"], ["demo"], [1, 2, 3], tmp_path, shots=[2]))
    results = run_grid(specs, progress=False, share_backbone=False)
    assert [r.status for r in results] == ["done", "failed", "done"]
    assert results[1].reason == "RuntimeError: CUDA out of memory"
    assert str(specs[1].out_dir) in caplog.text and "CUDA out of memory" in caplog.text
    assert calls == [
        ("train", 1),
        ("eval", "demo", "new"),
        ("train", 2),
        ("train", 3),
        ("eval", "demo", "new"),
    ]
    assert summarize(results) == "3 runs: 2 done, 0 skipped (complete), 1 failed"
    # second pass: complete runs are skipped without any call; the failed one is retried
    calls.clear()
    results = run_grid(specs, progress=False, share_backbone=False)
    assert [r.status for r in results] == ["skipped", "failed", "skipped"]
    assert calls == [("train", 2)]
    # a run that is trained but lacks an evaluation gets only the evaluation
    metrics = specs[0].out_dir / "metrics.json"
    data = json.loads(metrics.read_text())
    metrics.write_text(json.dumps({"evaluations": data["evaluations"][:1]}))
    calls.clear()
    assert execute(specs[0], progress=False).status == "done"
    assert calls == [("eval", "demo", "new")]


def test_a_target_it_cannot_evaluate_keeps_the_runs_other_results(tmp_path: Path, monkeypatch) -> None:
    """Cross-dataset: a trained run that cannot be evaluated on one target (a class name too long for
    the model's context) is still evaluated on the others; failed.json says which, stage "evaluation"."""
    calls: list = []
    _install_fake_runs(monkeypatch, calls)
    import vlprompt.protocols.runner as runner

    fake_eval = runner.evaluate_run

    def evaluate_run(run_dir, dataset=None, **kw):
        if dataset == "world-count":
            raise VlpromptError("prompt for class 'x' is 25 tokens, longer than the model's 24")
        return fake_eval(run_dir, dataset=dataset, **kw)

    monkeypatch.setattr(runner, "evaluate_run", evaluate_run)
    grid = GridRequest(
        "cross-dataset", ["coop"], ["world-count", "world-shapes"], [1], tmp_path, source="world-colour-shape"
    )
    (spec,) = plan_grid(grid)
    result = execute(spec, progress=False)
    assert result.status == "failed"
    assert result.reason == (
        "trained; evaluation failed on world-count/all: prompt for class 'x' is 25 tokens, longer than "
        "the model's 24"
    )
    assert ("eval", "world-shapes", "all") in calls  # the target after the failing one
    failed = json.loads((spec.out_dir / "failed.json").read_text())
    assert failed["stage"] == "evaluation" and failed["error"] == result.reason
    assert [e.dataset for e in spec.missing_evaluations()] == ["world-count"]


def test_run_cli_exit_code_and_dry_run(tmp_path: Path, monkeypatch, capsys) -> None:
    calls: list = []
    _install_fake_runs(monkeypatch, calls, fail_seed=2)
    argv = [
        "run",
        "--protocol",
        "fewshot",
        "--method",
        "coop",
        "--datasets",
        "demo",
        "--seeds",
        "1,2",
        "--shots",
        "4",
        "--out",
        str(tmp_path),
        "--model",
        "vlp-tiny",
        "--no-progress",
    ]
    assert main(argv + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 runs planned: 2 todo" in out and calls == []
    assert main(argv) == 1  # seed 2 fails, seed 1 still runs
    out = capsys.readouterr().out
    assert "1 done, 0 skipped (complete), 1 failed" in out
    assert f"failed: {tmp_path / 'fewshot' / 'coop' / 'demo' / 'shots4_seed2'}" in out
    assert (tmp_path / "fewshot" / "coop" / "demo" / "shots4_seed1" / "done").is_file()
    assert main(argv[:-1] + ["--seeds", "1", "--no-progress"]) == 0  # complete -> skipped, exit 0
    assert "1 skipped" in capsys.readouterr().out
    assert (
        main(
            [
                "run",
                "--protocol",
                "fewshot",
                "--method",
                "coop",
                "--datasets",
                "demo",
                "--seeds",
                "1,a",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "error: bad seed 'a'" in capsys.readouterr().err
