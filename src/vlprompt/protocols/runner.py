"""Execute a planned grid: train each run (resuming), add the evaluations it lacks, skip finished ones.

:func:`execute` handles exactly one :class:`~vlprompt.protocols.grid.RunSpec` and is a plain
top-level function returning a picklable :class:`RunResult`, so a parallel runner can call it in
worker processes. :func:`run_grid` runs specs one after another; a failing run is logged with its
directory and a one-line reason and does not stop the others.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from vlprompt.backbones import meta_backbone
from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model
from vlprompt.protocols.grid import RunSpec
from vlprompt.protocols.gridview import GridView
from vlprompt.run import (
    RequestRefused,
    RunDir,
    check_request,
    evaluate_run,
    load_backbone_from,
    request_fingerprint,
    train_run,
)
from vlprompt.run.learned import read_warning
from vlprompt.train.precision import resolve_device

log = logging.getLogger(__name__)

#: one backbone per (name, pretrained, weights) per process: loading it dominates a short run's time
_BACKBONES: dict[tuple[Any, ...], Any] = {}


@dataclass
class RunResult:
    """Outcome of one spec: ``status`` is ``skipped`` (complete, same fingerprint), ``done`` or ``failed``."""

    name: str
    out_dir: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    trained: bool = False
    evaluated: int = 0

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def _shared_backbone(cfg: Any) -> Any:
    """The run's backbone, loaded once per process and shared by every run that names it."""

    bb = cfg.backbone
    device = resolve_device(cfg.train.device)
    key = (bb.name, bb.pretrained, bb.weights, str(device))
    if key not in _BACKBONES:
        _BACKBONES.clear()  # keep at most one resident
        # a random-init backbone is seeded inside load_backbone (init_seed=0, global RNG untouched),
        # so it does not depend on which process loads it or after which run
        _BACKBONES[key] = load_backbone_from(bb, device=device)
    return _BACKBONES[key]


def status(spec: RunSpec) -> tuple[str, str]:
    """``(state, reason)`` of a spec without training: todo | trained | complete | conflict | invalid.

    ``complete`` and ``trained`` (done, evaluations missing) mean the finished run has the spec's
    fingerprint; ``conflict`` names the differing keys; ``invalid`` is a request that cannot run.
    """

    try:
        fp = request_fingerprint(spec.cfg)
        validate_model_settings(spec.cfg)
        decision = check_request(spec.cfg, RunDir(spec.out_dir), fp, resume=True, force=False)
    except VlpromptError as e:
        text = str(e)
        return ("conflict" if "other settings" in text else "invalid"), text
    if decision == "complete":
        return ("complete" if not spec.missing_evaluations() else "trained"), ""
    return ("resume" if decision == "resume" else "todo"), ""


def validate_model_settings(cfg: Any) -> None:
    """Build the method on the architecture's shapes (no weights: the meta device) so impossible
    settings -- a prompt depth beyond the model's layers, say -- are found before anything runs."""

    name = cfg.backbone.name
    if not name or cfg.backbone.weights:
        return  # the architecture is known only once the file is read; train_run checks it then
    if name not in _META:
        try:
            _META[name] = meta_backbone(name)
        except VlpromptError:
            raise
        except Exception:  # an architecture meta tensors cannot build: leave the check to train_run
            log.debug("meta-device build of %s failed", name, exc_info=True)
            _META[name] = None
    bb = _META[name]
    if bb is None:
        return
    opts = dataclasses.asdict(cfg.options)
    try:
        with torch.device("meta"):
            create_model(cfg.method, bb, ["a", "b"], **opts)
    except VlpromptError:
        raise
    except Exception:  # meta tensors cannot run every init (e.g. data-dependent ones): not a verdict
        log.debug("meta-device check of %s skipped", cfg.method, exc_info=True)


_META: dict[str, Any] = {}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if not isinstance(exc, VlpromptError) else first


class EvaluationsFailed(VlpromptError):
    """Training finished, but some evaluations could not be made (the others are recorded)."""


def record_failure(run_dir: str | os.PathLike, reason: str, stage: str = "run") -> None:
    """The one-line error the report shows, kept in the run directory (never creates the folder)."""

    try:
        RunDir(run_dir).record_failure(reason, stage)
    except OSError as e:  # an unwritable run directory must not hide the original error
        log.debug("could not record the failure in %s: %s", run_dir, e)


def execute(spec: RunSpec, progress: bool = True, share_backbone: bool = False) -> RunResult:
    """Bring one run to completion: train (resuming a partial run) then add missing evaluations.

    A finished run is skipped only when its fingerprint equals the spec's and metrics.json holds
    every evaluation the protocol needs (no weights are loaded for that); a finished run with other
    settings fails with one line naming the differing keys. Exceptions are caught and
    returned as a ``failed`` result with a one-line reason (the traceback goes to the debug log).
    """
    start = time.perf_counter()
    trained, evaluated = False, 0
    try:
        run = RunDir(spec.out_dir)
        force = False
        if run.is_complete():
            # reuse a finished run only when it computed exactly this spec (same fingerprint)
            try:
                decision = check_request(
                    spec.cfg, run, request_fingerprint(spec.cfg), resume=True, force=False
                )
            except VlpromptError:
                if not spec.force:
                    raise
                decision, force = "fresh", True
            if decision == "complete" and not spec.missing_evaluations():
                run.clear_failure()  # stale: e.g. a refusal that an earlier version recorded there
                return RunResult(spec.name, str(spec.out_dir), "skipped")
        backbone = _shared_backbone(spec.cfg) if share_backbone else None
        if force or not run.is_complete():
            log.info("train %s -> %s", spec.name, spec.out_dir)
            train_run(
                spec.cfg, spec.out_dir, resume=not force, progress=progress, backbone=backbone, force=force
            )
            trained = True
            if not run.is_complete():
                raise VlpromptError(f"training of {spec.out_dir} stopped before it finished; rerun to resume")
        failures = []
        for ev in spec.missing_evaluations():
            log.info("evaluate %s on %s (%s classes)", spec.name, ev.dataset, ev.subsample)
            try:
                evaluate_run(
                    spec.out_dir,
                    dataset=ev.dataset,
                    root=spec.root,
                    subsample=ev.subsample,
                    backbone=backbone,
                )
                evaluated += 1
            except VlpromptError as exc:  # a target it cannot be evaluated on keeps the run's other results
                failures.append(f"{ev.dataset}/{ev.subsample}: {_one_line(exc)}")
        if failures:
            raise EvaluationsFailed("trained; evaluation failed on " + "; ".join(failures))
        missing = spec.missing_evaluations()
        if missing:
            raise VlpromptError(
                "metrics.json still lacks " + ", ".join(f"{e.dataset}/{e.subsample}" for e in missing)
            )
    except Exception as exc:  # one failing run must not stop the grid
        log.debug("run %s failed:\n%s", spec.name, traceback.format_exc())
        stage = "evaluation" if isinstance(exc, EvaluationsFailed) else "run"
        # refused by a finished run with other settings: that run stays as it is (and in the reports)
        if not (isinstance(exc, RequestRefused) and RunDir(spec.out_dir).is_complete()):
            record_failure(spec.out_dir, _one_line(exc), stage)  # the report lists it with this reason
        return RunResult(
            spec.name,
            str(spec.out_dir),
            "failed",
            _one_line(exc),
            time.perf_counter() - start,
            trained,
            evaluated,
        )
    RunDir(spec.out_dir).clear_failure()
    return RunResult(
        spec.name, str(spec.out_dir), "done", "", time.perf_counter() - start, trained, evaluated
    )


def run_grid(
    specs: Iterable[RunSpec],
    progress: bool = True,
    share_backbone: bool = True,
    execute_fn: Callable[..., RunResult] = execute,
) -> list[RunResult]:
    """Execute specs sequentially, logging each outcome; returns every result (failures included)."""

    specs = list(specs)
    results = []
    view = GridView(len(specs), progress)  # runs done / running / failed and the grid's ETA
    for i, spec in enumerate(specs, 1):
        view.start(i)
        res = execute_fn(spec, progress=progress, share_backbone=share_backbone)
        view.finish(i, res)
        if res.status == "skipped":
            log.info("[%d/%d] skip %s (complete)", i, len(specs), spec.name)
        elif res.status == "failed":
            log.error("[%d/%d] FAILED %s (%s): %s", i, len(specs), spec.name, res.out_dir, res.reason)
        else:
            log.info("[%d/%d] done %s in %.1fs", i, len(specs), spec.name, res.seconds)
        results.append(res)
    view.close()
    return results


def summarize(results: list[RunResult]) -> str:
    """One line: how many runs were done, skipped and failed (+ one per run that learned nothing)."""
    n = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    line = f"{len(results)} runs: {n['done']} done, {n['skipped']} skipped (complete), {n['failed']} failed"
    warnings = [(r.name, read_warning(r.out_dir)) for r in results if r.ok]  # runs that learned nothing
    return "\n".join([line, *(f"warning: {name}: {w}" for name, w in warnings if w)])
