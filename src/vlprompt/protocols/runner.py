"""Execute a planned grid: train each run (resuming), add the evaluations it lacks, skip finished ones.

:func:`execute` handles exactly one :class:`~vlprompt.protocols.grid.RunSpec` and is a plain
top-level function returning a picklable :class:`RunResult`, so a parallel runner can call it in
worker processes. :func:`run_grid` runs specs one after another; a failing run is logged with its
directory and a one-line reason and does not stop the others.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlprompt.errors import VlpromptError
from vlprompt.protocols.grid import RunSpec

log = logging.getLogger(__name__)

#: one backbone per (name, pretrained, weights) per process: loading it dominates a short run's time
_BACKBONES: dict[tuple[Any, ...], Any] = {}


@dataclass
class RunResult:
    """Outcome of one spec: ``status`` is ``skipped`` (already complete), ``done`` or ``failed``."""

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


def _shared_backbone(cfg: dict[str, Any]) -> Any:
    """The run's backbone, loaded once per process and shared by every run that names it."""
    from vlprompt.backbones import load_backbone
    from vlprompt.train.precision import resolve_device

    bb = cfg.get("backbone") or {}
    device = resolve_device((cfg.get("train") or {}).get("device", "auto"))
    key = (bb.get("name"), bb.get("pretrained"), bb.get("weights"), str(device))
    if key not in _BACKBONES:
        if bb.get("weights") and not Path(bb["weights"]).is_file():
            raise VlpromptError(
                f"backbone weights file not found: {bb['weights']}; pass --weights PATH to a local copy"
            )
        _BACKBONES.clear()  # keep at most one resident
        pretrained = bb.get("weights") or bb.get("pretrained")
        # a random-init backbone is seeded inside load_backbone (init_seed=0, global RNG untouched),
        # so it does not depend on which process loads it or after which run
        _BACKBONES[key] = load_backbone(bb.get("name"), pretrained=pretrained, device=device)
        if _BACKBONES[key].meta.get("source") == "random-init":  # not bundled (vlp-world) weights
            log.warning(
                "untrained weights: pipeline check only, accuracy is chance (%s random init)", bb.get("name")
            )
    return _BACKBONES[key]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if not isinstance(exc, VlpromptError) else first


def execute(spec: RunSpec, progress: bool = True, share_backbone: bool = False) -> RunResult:
    """Bring one run to completion: train (resuming a partial run) then add missing evaluations.

    A run counts as complete when its ``done`` file exists and metrics.json holds every evaluation
    the protocol needs; such a run is skipped without loading anything. Exceptions are caught and
    returned as a ``failed`` result with a one-line reason (the traceback goes to the debug log).
    """
    start = time.perf_counter()
    if spec.is_complete():
        return RunResult(spec.name, str(spec.out_dir), "skipped")
    trained, evaluated = False, 0
    try:
        from vlprompt.protocols.runs import evaluate_run, train_run

        backbone = _shared_backbone(spec.cfg) if share_backbone else None
        if not (spec.out_dir / "done").is_file():
            log.info("train %s -> %s", spec.name, spec.out_dir)
            train_run(spec.cfg, spec.out_dir, resume=True, progress=progress, backbone=backbone)
            trained = True
            if not (spec.out_dir / "done").is_file():
                raise VlpromptError(
                    f"training stopped before writing {spec.out_dir / 'done'}; rerun to resume"
                )
        for ev in spec.missing_evaluations():
            log.info("evaluate %s on %s (%s classes)", spec.name, ev.dataset, ev.subsample)
            evaluate_run(
                spec.out_dir, dataset=ev.dataset, root=spec.root, subsample=ev.subsample, backbone=backbone
            )
            evaluated += 1
        missing = spec.missing_evaluations()
        if missing:
            raise VlpromptError(
                "metrics.json still lacks " + ", ".join(f"{e.dataset}/{e.subsample}" for e in missing)
            )
    except Exception as exc:  # one failing run must not stop the grid
        log.debug("run %s failed:\n%s", spec.name, traceback.format_exc())
        return RunResult(
            spec.name,
            str(spec.out_dir),
            "failed",
            _one_line(exc),
            time.perf_counter() - start,
            trained,
            evaluated,
        )
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
    for i, spec in enumerate(specs, 1):
        res = execute_fn(spec, progress=progress, share_backbone=share_backbone)
        if res.status == "skipped":
            log.info("[%d/%d] skip %s (complete)", i, len(specs), spec.name)
        elif res.status == "failed":
            log.error("[%d/%d] FAILED %s (%s): %s", i, len(specs), spec.name, res.out_dir, res.reason)
        else:
            log.info("[%d/%d] done %s in %.1fs", i, len(specs), spec.name, res.seconds)
        results.append(res)
    return results


def summarize(results: list[RunResult]) -> str:
    """One line: how many runs were done, skipped and failed."""
    n = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    return f"{len(results)} runs: {n['done']} done, {n['skipped']} skipped (complete), {n['failed']} failed"
