"""Run records: what the report reads from run directories (config, metrics, manifest, env, log).

Only run-directory files are read (through the run layer); console logs are never parsed.  Runs
trained with plain ``vlprompt train`` (no protocol) and imported prompts get the protocol
:data:`SINGLE`; failed runs carry their one-line error (``failed.json``, written by the grid runner).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlprompt.data.custom import public_name
from vlprompt.errors import VlpromptError
from vlprompt.run.backbone import recorded_random_backbone
from vlprompt.run.layout import CONFIG, FAILED, MANIFEST, METRICS, PROMPT, RunDir

SINGLE = "single"  # protocol of runs made by plain `vlprompt train` (and imported prompts)
MOST_CONFUSED = 5  # pairs per evaluation in the "most confused pairs" table


# ---------------------------------------------------------------------------------------- runs
@dataclass
class RunRecord:
    """What the report needs from one run directory."""

    path: Path
    method: str
    protocol: str
    dataset: str
    shots: int | None
    seed: int | None
    backbone: str
    random_backbone: bool
    done: bool
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # the one-line reason of a failed run (failed.json)
    imported: bool = False
    #: trained, and its recorded evaluations stand; ``error`` says which other evaluations failed
    partial: bool = False

    def accuracy(self, dataset: str, subsample: str) -> float | None:
        """Test accuracy for (dataset, subsample); the last recorded entry wins."""
        hit = None
        for e in self.evaluations:
            if (
                e.get("dataset") == dataset
                and e.get("subsample", "all") == subsample
                and e.get("split", "test") == "test"
            ):
                hit = e.get("accuracy")
        return None if hit is None else float(hit)


def load_run_record(run_dir: str | Path) -> RunRecord | None:
    """Read one run directory through the run layer (None when it has no readable config)."""

    run = RunDir(run_dir)
    run_dir = run.path

    def safe(read: Any, default: Any = None) -> Any:
        try:
            return read()
        except VlpromptError:  # a damaged or crafted file: the run is listed without it
            return default

    manifest = safe(run.manifest)
    cfg = safe(run.read_config) if run.has_config() else None
    if not cfg:
        cfg = _config_from_manifest(manifest)
        if cfg is None:
            return None
    if not isinstance(cfg, dict) or "method" not in cfg:
        return None
    data = cfg.get("data") or {}
    env = safe(run.env)
    metrics = safe(run.metrics, {}) or {}
    bb = cfg.get("backbone") or {}
    weights = bb.get("weights") or bb.get("weights_file")
    tag = bb.get("pretrained") or (Path(str(weights)).name if weights else None)
    random = recorded_random_backbone(cfg, manifest, env)
    imported = isinstance(manifest, dict) and bool(manifest.get("imported_from"))
    try:
        run.verify()  # an edited config / fingerprint / manifest / prompt is listed as such, never as data
        problem = None
    except VlpromptError as e:
        problem = str(e)
    if problem is None and run.is_complete() and not imported:  # `done`, but what it made is gone
        lost = [n for n in (MANIFEST, PROMPT) if not (run_dir / n).is_file()]
        if lost or not isinstance(manifest, dict):
            what = ", ".join(lost) if lost else f"{MANIFEST} (unreadable)"
            problem = f"marked done, but {what} is missing; train it again (vlprompt train ... --force)"
    return RunRecord(
        path=run_dir,
        method=str(cfg["method"]),
        protocol=str(cfg.get("protocol") or SINGLE),
        dataset=public_name(str(data.get("dataset"))),
        shots=data.get("shots"),
        seed=data.get("seed"),
        backbone=f"{bb.get('name')} ({'random init' if random else tag or _untagged(manifest)})",
        random_backbone=random,
        done=problem is None and (run.is_complete() or (imported and bool(metrics))),
        evaluations=list(metrics.get("evaluations", [])) if isinstance(metrics, dict) and not problem else [],
        error=problem or safe(run.failure),
        imported=imported,
        partial=problem is None and run.is_complete() and bool(safe(run.failed_evaluations_only)),
    )


def _untagged(manifest: Any) -> str:
    """What a pretrained backbone without tag or file is: the weights bundled with its name (vlp-world)."""
    section = manifest.get("backbone") if isinstance(manifest, dict) else None
    return (
        "bundled weights" if isinstance(section, dict) and section.get("bundled_weights_sha256") else "no tag"
    )


def _config_from_manifest(manifest: Any) -> dict[str, Any] | None:
    """The parts of a config an export or imported prompt's manifest records (it has no config.yaml)."""
    if not isinstance(manifest, dict) or manifest.get("format") != "vlprompt-prompt":
        return None
    return {
        "method": manifest.get("method"),
        "protocol": manifest.get("protocol"),
        "data": {
            "dataset": manifest.get("dataset"),
            "shots": manifest.get("shots"),
            "seed": manifest.get("seed"),
        },
        "backbone": manifest.get("backbone") or {},
    }


def collect_runs(runs_dir: str | Path) -> list[RunRecord]:
    """Every run directory (a folder with config.yaml) below ``runs_dir``, sorted by path."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise VlpromptError(f"runs directory not found: {runs_dir}; pass the --out folder of `vlprompt run`")

    dirs = {p.parent for p in runs_dir.rglob(CONFIG)}
    dirs |= {p.parent for p in runs_dir.rglob(MANIFEST) if (p.parent / METRICS).is_file()}
    dirs |= {p.parent for p in runs_dir.rglob(FAILED)}
    records = []
    for d in sorted(dirs):
        if d.name == "report" or any(part == "report" for part in d.relative_to(runs_dir).parts[:-1]):
            continue
        rec = load_run_record(d)
        if rec is not None:
            records.append(rec)
        elif (err := RunDir(d).failure()) is not None:  # refused before writing its config
            records.append(RunRecord(d, "?", "?", "?", None, None, "?", False, False, [], err))
    return records


# ---------------------------------------------------------------------------------------- logs
def read_training_curve(run_dir: str | Path) -> list[tuple[float, float | None, float | None]]:
    """(step, loss, acc) points from ``log.jsonl``: per-step records (per-epoch records if only those)."""
    recs = [r for r in RunDir(run_dir).log_records() if isinstance(r, dict) and r.get("loss") is not None]
    kind = next((k for k in ("kind", "type", "event", "level") if any(k in r for r in recs)), None)
    if kind:
        steps = [r for r in recs if r.get(kind) not in ("epoch", "eval", "evaluation")]
        recs = steps or recs
    pts = []
    last = -math.inf
    monotone = all(isinstance(r.get("step"), (int, float)) for r in recs)
    for i, r in enumerate(recs):
        x = r["step"] if monotone else i
        if monotone and x < last:  # step counter restarts each epoch: fall back to record order
            return [(j, _num(q.get("loss")), _num(q.get("acc"))) for j, q in enumerate(recs)]
        last = x
        pts.append((float(x), _num(r.get("loss")), _num(r.get("acc"))))
    return pts


def _num(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def read_epoch_curve(run_dir: str | Path) -> list[tuple[float, float | None, float | None]]:
    """``(epoch, loss, acc)`` per logged step, ``epoch`` fractional: step k of n in epoch e is e-1+k/n.

    Runs logged per epoch only give one point per epoch (at e).  This is what the training-curve
    plots use: an x axis in epochs reads the same for runs of different lengths and batch sizes.
    """
    steps: dict[int, list[dict[str, Any]]] = defaultdict(list)
    epochs: dict[int, dict[str, Any]] = {}
    for rec in RunDir(run_dir).log_records():
        if not isinstance(rec, dict) or not isinstance(rec.get("epoch"), (int, float)):
            continue
        e = int(rec["epoch"])
        if rec.get("kind") == "epoch":
            epochs[e] = rec
        else:
            steps[e].append(rec)
    pts: list[tuple[float, float | None, float | None]] = []
    for e in sorted(set(steps) | set(epochs)):
        recs = steps.get(e)
        if recs:
            n = len(recs)
            pts += [
                (e - 1 + (k + 1) / n, _num(r.get("loss")), _num(r.get("acc"))) for k, r in enumerate(recs)
            ]
        else:
            r = epochs[e]
            pts.append((float(e), _num(r.get("loss")), _num(r.get("acc"))))
    return pts


def most_confused(entry: dict[str, Any], k: int = MOST_CONFUSED) -> list[tuple[str, str, int, float]]:
    """The ``k`` largest off-diagonal cells of an evaluation's confusion counts.

    ``(true class, predicted class, images, % of the true class's images)``; ties by class order.
    """
    conf = entry.get("confusion") or {}
    classes = conf.get("classes") or []
    counts = conf.get("counts") or []
    support: dict[int, int] = defaultdict(int)
    for i, _, n in counts:
        support[int(i)] += int(n)
    off = [(int(n), int(i), int(j)) for i, j, n in counts if int(i) != int(j) and int(n) > 0]
    off.sort(key=lambda x: (-x[0], x[1], x[2]))
    return [(classes[i], classes[j], n, 100.0 * n / max(support[i], 1)) for n, i, j in off[:k]]
