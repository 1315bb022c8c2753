"""Tables (Markdown + CSV) and plots in the papers' layout, built only from run-directory files.

Inputs are ``config.yaml``, ``metrics.json``, ``log.jsonl`` (and ``manifest.json`` / ``env.json``
to detect a random-init backbone) of every run under a runs directory; console logs are never
parsed. Numbers are the papers' convention: accuracy of the last epoch, mean and (population)
standard deviation over seeds; per data set HM = HM of the seed-averaged Base and New; the
base-to-new "Average" row is HM(mean Base, mean New) over data sets, not the mean of per-data-set
HMs; cross-dataset / DG averages are plain means over the targets.

Published numbers (``--reference``) are compared like with like: beside an average over our data
sets stands the published average over the *same* data sets (computed from the papers' per-data-set
numbers, and labelled so), never the papers' 11-data-set average.  Runs trained with plain
``vlprompt train`` (no protocol) and imported prompts are listed as single runs; failed runs appear
with their one-line error (``failed.json``, written by the grid runner).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlprompt.errors import VlpromptError
from vlprompt.protocols import reference as ref
from vlprompt.utils import atomic_write_text

log = logging.getLogger(__name__)

RANDOM_BANNER = "untrained (random) backbone: numbers are a pipeline check, not CLIP results"
DPL_NOTE = "(reconstructed from the paper's abstract)"
PUB = "pub."  # column marker of published numbers; the report explains it once
SINGLE = "single"  # protocol of runs made by plain `vlprompt train` (and imported prompts)
MOST_CONFUSED = 5  # pairs per evaluation in the "most confused pairs" table

_DISPLAY = {
    "zeroshot": "zero-shot CLIP",
    "coop": "CoOp",
    "cocoop": "CoCoOp",
    "ivlp": "IVLP",
    "vpt": "VPT-deep",
    "maple": "MaPLe",
    "mpl": "MPL",
    "kgcoop": "KgCoOp",
    "prograd": "ProGrad",
    "promptsrc": "PromptSRC",
}


# ---------------------------------------------------------------------------------------- numbers
def harmonic_mean(base: float, new: float) -> float:
    """HM = 2BN/(B+N) (0 when both are 0)."""
    return 0.0 if base + new == 0 else 2.0 * base * new / (base + new)


@dataclass(frozen=True)
class MeanStd:
    """Mean and population std (ddof=0, as the reference toolkit's result parser) over ``n`` seeds."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}" if self.n > 1 else f"{self.mean:.2f}"


def mean_std(values: Iterable[float]) -> MeanStd | None:
    vals = [float(v) for v in values]
    if not vals:
        return None
    m = sum(vals) / len(vals)
    return MeanStd(m, math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals)), len(vals))


def method_label(method: str) -> str:
    """Display name; every DPL variant carries the reconstruction note."""
    if method.lower().startswith("dpl"):
        return "DPL" + method[3:] + " " + DPL_NOTE
    return _DISPLAY.get(method.lower(), method)


def method_key(method: str) -> tuple[bool, str]:
    """Table and plot order: zero-shot CLIP first (the row every method is read against), then by name."""
    return (method.lower() != "zeroshot", method)


def dataset_order(names: Iterable[str]) -> list[str]:
    """Papers' table order for the benchmarks, then anything else alphabetically."""
    from vlprompt.data import BENCHMARKS, DG_TARGETS

    order = {n: i for i, n in enumerate([*BENCHMARKS, *DG_TARGETS])}
    return sorted(set(names), key=lambda n: (order.get(n, len(order)), n))


def dataset_title(name: str) -> str:
    from vlprompt.data import SPECS

    spec = SPECS.get(name)
    return spec.title if spec else name


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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _random_backbone(cfg: dict[str, Any], manifest: Any, env: Any) -> bool:
    """True when any run-dir file says the backbone weights were randomly initialised."""

    def flags(obj: Any) -> Iterable[bool]:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k in ("random_init", "random_weights", "untrained") and isinstance(v, bool):
                    yield v
                elif k == "source" and v == "random-init":
                    yield True
                else:
                    yield from flags(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from flags(v)

    explicit = [f for obj in (manifest, env) for f in flags(obj)]
    if explicit:
        return any(explicit)
    bb = cfg.get("backbone") or {}
    if isinstance(manifest, dict) and isinstance(manifest.get("backbone"), dict):
        bb = {**bb, **manifest["backbone"]}
    return not bb.get("pretrained") and not bb.get("weights")


def load_run_record(run_dir: str | Path) -> RunRecord | None:
    """Read one run directory through the run layer (None when it has no readable config)."""
    from vlprompt.run import RunDir

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
    random = _random_backbone(cfg, manifest, env)
    imported = isinstance(manifest, dict) and bool(manifest.get("imported_from"))
    return RunRecord(
        path=run_dir,
        method=str(cfg["method"]),
        protocol=str(cfg.get("protocol") or SINGLE),
        dataset=str(data.get("dataset")),
        shots=data.get("shots"),
        seed=data.get("seed"),
        backbone=f"{bb.get('name')} ({'random init' if random else tag or _untagged(manifest)})",
        random_backbone=random,
        done=run.is_complete() or (imported and bool(metrics)),
        evaluations=list(metrics.get("evaluations", [])) if isinstance(metrics, dict) else [],
        error=safe(run.failure),
        imported=imported,
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
    from vlprompt.run import RunDir
    from vlprompt.run.layout import CONFIG, FAILED, MANIFEST, METRICS

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


# ---------------------------------------------------------------------------------------- tables
@dataclass
class Table:
    """A titled table; cells are str, float, MeanStd or None. ``name`` is the CSV file stem."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        def fmt(v: Any) -> str:
            if v is None:
                return "–"
            if isinstance(v, float):
                return f"{v:.2f}"
            return str(v).replace("|", "\\|")

        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(fmt(c) for c in self.columns) + " |")
        numeric = [
            i > 0 and all(isinstance(r[i], (int, float, MeanStd)) or r[i] is None for r in self.rows)
            for i in range(len(self.columns))
        ]
        lines.append("|" + "|".join("---:" if num else "---" for num in numeric) + "|")
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in self.rows]
        lines += [""] + [f"{n}" for n in self.notes] + ([""] if self.notes else [])
        return "\n".join(lines)

    def csv(self) -> str:
        """CSV with every mean ± std column split into ``<col> mean``, ``<col> std`` and ``<col> n``."""
        split = [any(isinstance(r[i], MeanStd) for r in self.rows) for i in range(len(self.columns))]
        header = []
        for c, s in zip(self.columns, split):
            header += [f"{c} mean", f"{c} std", f"{c} n"] if s else [c]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        for row in self.rows:
            out = []
            for v, s in zip(row, split):
                if s:
                    if isinstance(v, MeanStd):
                        out += [f"{v.mean:.4f}", f"{v.std:.4f}", v.n]
                    else:
                        out += [_csv_cell(v), "", ""]
                else:
                    out.append(_csv_cell(v))
            w.writerow(out)
        return buf.getvalue()


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return v


def _group_key(r: RunRecord) -> tuple[str, int | None]:
    return (r.method, r.shots)


def _suffix(shots: int | None, all_shots: set[Any]) -> str:
    return f", {shots} shots" if len(all_shots) > 1 else ""


@dataclass
class Base2NewRow:
    dataset: str
    base: MeanStd | None
    new: MeanStd | None

    @property
    def hm(self) -> float | None:
        if self.base is None or self.new is None:
            return None
        return harmonic_mean(self.base.mean, self.new.mean)


def base2new_summary(
    runs: Sequence[RunRecord],
) -> tuple[list[Base2NewRow], tuple[float, float, float] | None]:
    """Per-data-set seed statistics of one method's base2new runs and the Average row (B, N, HM).

    Average = (mean of the data sets' seed-averaged Base, same for New, HM of those two means),
    over the data sets that have both Base and New.
    """
    by_ds: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"base": [], "new": []})
    for r in runs:
        for sub in ("base", "new"):
            acc = r.accuracy(r.dataset, sub)
            if acc is not None:
                by_ds[r.dataset][sub].append(acc)
    rows = [
        Base2NewRow(d, mean_std(by_ds[d]["base"]), mean_std(by_ds[d]["new"])) for d in dataset_order(by_ds)
    ]
    full = [row for row in rows if row.base is not None and row.new is not None]
    if not full:
        return rows, None
    mb = sum(row.base.mean for row in full) / len(full)
    mn = sum(row.new.mean for row in full) / len(full)
    return rows, (mb, mn, harmonic_mean(mb, mn))


def published_base2new_average(
    paper: str, datasets: Sequence[str]
) -> tuple[tuple[float | None, float | None, float | None] | None, str]:
    """The published (Base, New, HM) average over exactly ``datasets``, and how it was obtained.

    The papers' own average when ``datasets`` are their 11; otherwise HM(mean Base, mean New) of the
    papers' per-data-set Base/New (the same rule as ours), or -- where only per-data-set HMs are
    stored -- the plain mean of those HMs (Base/New then unknown).  ``None`` when a data set has no
    published number.
    """
    from vlprompt.data import BENCHMARKS

    datasets = list(datasets)
    if not datasets:
        return None, "no data sets"
    if set(datasets) == set(BENCHMARKS) and paper in ref.BASE2NEW_AVERAGE:
        return ref.BASE2NEW_AVERAGE[paper], "the papers' 11-data-set average"
    bn = ref.BASE2NEW_BN.get(paper, {})
    if all(d in bn for d in datasets):
        mb = sum(bn[d][0] for d in datasets) / len(datasets)
        mn = sum(bn[d][1] for d in datasets) / len(datasets)
        return (mb, mn, harmonic_mean(mb, mn)), "HM(mean Base, mean New) of the papers' per-data-set numbers"
    hm = ref.BASE2NEW_HM.get(paper, {})
    if all(d in hm for d in datasets):
        return (
            None,
            None,
            sum(hm[d] for d in datasets) / len(datasets),
        ), "mean of the papers' per-data-set HM"
    return None, "not published for all of these data sets"


def _avg_label(n: int) -> str:
    return f"Average ({n} data set{'s' if n != 1 else ''})"


def _base2new_tables(runs: list[RunRecord], reference: bool) -> tuple[list[Table], dict[str, Any]]:
    tables: list[Table] = []
    all_shots = {r.shots for r in runs}
    groups: dict[tuple[str, Any], list[RunRecord]] = defaultdict(list)
    for r in runs:
        groups[_group_key(r)].append(r)
    summaries = {}
    for (method, shots), rs in sorted(groups.items(), key=lambda kv: (method_key(kv[0][0]), kv[0][1] or 0)):
        rows, avg = base2new_summary(rs)
        summaries[(method, shots)] = (rows, avg)
        paper = ref.paper_name(method) if reference else None
        cols = ["Data set", "Base", "New", "HM", "seeds"]
        if paper:
            cols += [f"Base ({PUB})", f"New ({PUB})", f"HM ({PUB})"]
        body = []
        for row in rows:
            n = max(row.base.n if row.base else 0, row.new.n if row.new else 0)
            line: list[Any] = [dataset_title(row.dataset), row.base, row.new, row.hm, n]
            if paper:
                bn = ref.BASE2NEW_BN.get(paper, {}).get(row.dataset)
                line += [
                    bn[0] if bn else None,
                    bn[1] if bn else None,
                    ref.BASE2NEW_HM.get(paper, {}).get(row.dataset),
                ]
            body.append(line)
        notes = [
            "Base / New: top-1 test accuracy (%) of the last epoch, mean ± std over seeds; HM = 2BN/(B+N) "
            "of the seed means. Average: HM(mean Base, mean New) over the data sets with both."
        ]
        if avg is not None:
            covered = [row.dataset for row in rows if row.base is not None and row.new is not None]
            line = [_avg_label(len(covered)), avg[0], avg[1], avg[2], None]
            if paper:
                pub, how = published_base2new_average(paper, covered)
                line += list(pub) if pub else [None, None, None]
                notes.append(f"Average ({PUB}): over the same {len(covered)} data set(s) -- {how}.")
            body.append(line)
        tables.append(
            Table(
                f"base2new_{method}" + (f"_shots{shots}" if len(all_shots) > 1 else ""),
                f"Base-to-new: {method_label(method)}{_suffix(shots, all_shots)}",
                cols,
                body,
                notes,
            )
        )
    # comparison across methods: rows data sets, a Base / New / HM column group per method
    methods = sorted({m for m, _ in groups}, key=method_key)
    for shots in sorted(all_shots, key=lambda s: s or 0):
        present = [m for m in methods if (m, shots) in summaries]
        if not present:
            continue
        cols = ["Data set"]
        for m in present:
            cols += [f"{method_label(m)} Base", f"{method_label(m)} New", f"{method_label(m)} HM"]
            if reference and ref.paper_name(m) in ref.BASE2NEW_HM:
                cols.append(f"{ref.paper_name(m)} HM ({PUB})")
        datasets = dataset_order({row.dataset for m in present for row in summaries[(m, shots)][0]})
        body = []
        for d in [*datasets, "__avg__"]:
            line: list[Any] = ["Average" if d == "__avg__" else dataset_title(d)]
            for m in present:
                rows, avg = summaries[(m, shots)]
                covered = [x.dataset for x in rows if x.base is not None and x.new is not None]
                if d == "__avg__":
                    line += list(avg) if avg else [None, None, None]
                else:
                    row = next((x for x in rows if x.dataset == d), None)
                    line += [
                        row.base.mean if row and row.base else None,
                        row.new.mean if row and row.new else None,
                        row.hm if row else None,
                    ]
                if reference and ref.paper_name(m) in ref.BASE2NEW_HM:
                    p = ref.paper_name(m)
                    if d == "__avg__":
                        pub, _ = published_base2new_average(p, covered)
                        line.append(pub[2] if pub else None)
                    else:
                        line.append(ref.BASE2NEW_HM[p].get(d))
            body.append(line)
        notes = ["Average row: HM(mean Base, mean New) over each method's data sets."]
        if reference:
            notes.append(f"HM ({PUB}) in the Average row: over the same data sets as that method's runs.")
        tables.append(
            Table(
                "base2new_comparison" + (f"_shots{shots}" if len(all_shots) > 1 else ""),
                f"Base-to-new: comparison of methods (seed means){_suffix(shots, all_shots)}",
                cols,
                body,
                notes,
            )
        )
    return tables, summaries


def _transfer_tables(runs: list[RunRecord], protocol: str, reference: bool) -> list[Table]:
    """Cross-dataset / DG: one row per method, accuracy per target, plain mean over targets."""
    from vlprompt.data import CROSS_DATASET_TARGETS, DG_TARGETS

    standard = CROSS_DATASET_TARGETS if protocol == "cross-dataset" else DG_TARGETS
    all_shots = {r.shots for r in runs}
    groups: dict[tuple[str, Any], list[RunRecord]] = defaultdict(list)
    for r in runs:
        groups[_group_key(r)].append(r)
    sources = dataset_order({r.dataset for r in runs})
    targets = dataset_order(
        {e.get("dataset") for r in runs for e in r.evaluations if e.get("dataset") not in sources}
    )
    targets = [t for t in standard if t in targets] + [t for t in targets if t not in standard]
    cols = (
        ["Method"] + [f"{dataset_title(s)} (source)" for s in sources] + [dataset_title(t) for t in targets]
    )
    cols += ["Average (targets)"]
    body = []
    for (method, shots), rs in sorted(groups.items(), key=lambda kv: (method_key(kv[0][0]), kv[0][1] or 0)):
        line: list[Any] = [method_label(method) + _suffix(shots, all_shots)]
        for s in sources:
            line.append(mean_std(a for r in rs if r.dataset == s and (a := r.accuracy(s, "all")) is not None))
        means = []
        for t in targets:
            ms = mean_std(a for r in rs if (a := r.accuracy(t, "all")) is not None)
            line.append(ms)
            if ms is not None:
                means.append(ms.mean)
        line.append(sum(means) / len(means) if means else None)
        body.append(line)
    notes = [
        "Top-1 test accuracy (%) on each target's full test set, mean ± std over seeds; "
        f"Average = plain mean over the {len(targets)} target(s) shown."
    ]
    missing = [t for t in standard if t not in targets]
    if missing:
        notes.append(
            f"Not evaluated (missing from metrics.json): {', '.join(missing)}; the average is not "
            "comparable to the papers' average over all targets."
        )
    if reference and not missing:  # like with like: the papers average over all standard targets
        pub = ref.CROSS_DATASET_AVERAGE if protocol == "cross-dataset" else ref.DG_AVERAGE
        for name, avg in pub.items():
            body.append([f"{name} ({PUB})"] + [None] * (len(cols) - 2) + [avg])
        notes.append(f"Rows marked ({PUB}) are the papers' averages over the same {len(standard)} targets.")
    elif reference:
        notes.append(
            f"Published averages ({PUB}) cover all {len(standard)} targets and the papers do not give the "
            "per-target numbers here, so none is shown beside this partial average."
        )
    title = "Cross-dataset transfer" if protocol == "cross-dataset" else "Domain generalisation"
    return [Table(protocol.replace("-", "_"), title, cols, body, notes)] if body else []


def fewshot_summary(runs: Sequence[RunRecord]) -> dict[str, dict[str, dict[int, MeanStd]]]:
    """``[dataset][method][K] -> MeanStd`` of the all-class test accuracy over seeds."""
    acc: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in runs:
        a = r.accuracy(r.dataset, "all")
        if a is not None and r.shots is not None:
            acc[r.dataset][r.method][int(r.shots)].append(a)
    return {
        d: {m: {k: mean_std(v) for k, v in sorted(per_k.items())} for m, per_k in sorted(acc[d].items())}
        for d in dataset_order(acc)
    }


def _fewshot_tables(runs: list[RunRecord]) -> tuple[list[Table], dict[str, Any]]:
    summary = fewshot_summary(runs)
    tables = []
    for d, per_method in summary.items():
        ks = sorted({k for per_k in per_method.values() for k in per_k})
        methods = sorted(per_method, key=method_key)
        body = [[k] + [per_method[m].get(k) for m in methods] for k in ks]
        tables.append(
            Table(
                f"fewshot_{d}",
                f"Few-shot: {dataset_title(d)}",
                ["Shots (K)"] + [method_label(m) for m in methods],
                body,
                ["Top-1 test accuracy (%) over all classes, mean ± std over seeds."],
            )
        )
    return tables, summary


# ---------------------------------------------------------------------------------------- logs
def read_training_curve(run_dir: str | Path) -> list[tuple[float, float | None, float | None]]:
    """(step, loss, acc) points from ``log.jsonl``: per-step records (per-epoch records if only those)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    recs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("loss") is not None:
            recs.append(rec)
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
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    steps: dict[int, list[dict[str, Any]]] = defaultdict(list)
    epochs: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
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


def _confusion_table(runs: Sequence[RunRecord]) -> Table | None:
    body = []
    for r in runs:
        for e in r.evaluations:
            for true, pred, n, pct in most_confused(e):
                body.append(
                    [_run_name(r), f"{dataset_title(str(e.get('dataset')))} ({e.get('subsample', 'all')})",
                     true, pred, n, pct]
                )  # fmt: skip
    if not body:
        return None
    return Table(
        "most_confused",
        "Most confused pairs",
        ["Run", "Evaluated on", "True class", "Predicted as", "images", "% of true class"],
        body,
        [f"Per evaluation, the {MOST_CONFUSED} largest off-diagonal cells of the confusion matrix."],
    )


def _run_name(r: RunRecord) -> str:
    return f"{method_label(r.method)} · {r.dataset} · shots {r.shots} · seed {r.seed}"


def _single_table(runs: Sequence[RunRecord]) -> Table:
    body = []
    for r in runs:
        for e in r.evaluations:
            body.append(
                [
                    f"`{r.path.name}`" + (" (imported)" if r.imported else ""),
                    method_label(r.method),
                    r.dataset,
                    r.shots,
                    r.seed,
                    f"{dataset_title(str(e.get('dataset')))} ({e.get('subsample', 'all')})",
                    _num(e.get("accuracy")),
                    _num(e.get("macro_f1")),
                    e.get("n"),
                ]
            )
    return Table(
        "single_runs",
        "Single runs",
        ["Run", "Method", "Trained on", "Shots", "Seed", "Evaluated on", "Accuracy", "Macro-F1", "images"],
        body,
        ["Runs made by `vlprompt train` (no protocol) or imported with `vlprompt import`: one seed each."],
    )


# ---------------------------------------------------------------------------------------- report
@dataclass
class ReportResult:
    markdown: Path
    csvs: list[Path]
    plots: list[Path]
    tables: list[Table]
    runs: int
    random_backbone: bool


def build_report(
    runs_dir: str | Path, out_dir: str | Path | None = None, reference: bool = False, plots: bool = True
) -> ReportResult:
    """Write report.md, one CSV per table and the PNG plots for every complete run under ``runs_dir``."""
    runs_dir = Path(runs_dir)
    out_dir = Path(out_dir) if out_dir else runs_dir / "report"
    records = collect_runs(runs_dir)
    complete = [r for r in records if r.done and r.evaluations and not r.error]
    incomplete = [r for r in records if r not in complete]
    if not complete:
        failed = [r for r in records if r.error]
        why = f"; {len(failed)} failed, e.g. {failed[0].path}: {failed[0].error}" if failed else ""
        raise VlpromptError(
            f"no complete run (config.yaml + metrics.json + done) under {runs_dir}{why}; "
            "run `vlprompt run` first"
        )
    by_protocol: dict[str, list[RunRecord]] = defaultdict(list)
    for r in complete:
        by_protocol[r.protocol].append(r)

    tables: list[Table] = []
    b2n_summaries: dict[str, Any] = {}
    fs_summary: dict[str, Any] = {}
    sections: list[tuple[str, list[Table]]] = []
    if by_protocol.get("base2new"):
        t, b2n_summaries = _base2new_tables(by_protocol["base2new"], reference)
        sections.append(("Base-to-new generalisation", t))
    for proto in ("cross-dataset", "dg"):
        if by_protocol.get(proto):
            sections.append(
                (
                    "Cross-dataset transfer" if proto == "cross-dataset" else "Domain generalisation",
                    _transfer_tables(by_protocol[proto], proto, reference),
                )
            )
    if by_protocol.get("fewshot"):
        t, fs_summary = _fewshot_tables(by_protocol["fewshot"])
        sections.append(("Few-shot learning", t))
    if by_protocol.get(SINGLE):
        sections.append(("Single runs", [_single_table(by_protocol[SINGLE])]))
    other = sorted(set(by_protocol) - {"base2new", "cross-dataset", "dg", "fewshot", SINGLE})
    confused = _confusion_table(complete)
    if confused is not None:
        sections.append(("Which classes are confused", [confused]))
    if reference:
        pub = Table(
            "published_base2new",
            f"Published base-to-new averages over the papers' 11 data sets ({PUB})",
            ["Method", f"Base ({PUB})", f"New ({PUB})", f"HM ({PUB})"],
            [[name, *v] for name, v in ref.BASE2NEW_AVERAGE.items()],
            ["For reference only: these average 11 data sets, so they compare with an 11-data-set run."],
        )
        sections.append(("Published reference numbers", [pub]))
    for _, ts in sections:
        tables += ts

    random_runs = [r for r in complete if r.random_backbone]
    backbones = sorted({r.backbone for r in complete})
    lines = ["# vlprompt report", ""]
    if random_runs:
        lines += [
            f"> **⚠ {RANDOM_BANNER}.**",
            f"> ({len(random_runs)} of {len(complete)} runs used random weights.)",
            "",
        ]
    off_world = [
        r for r in complete if r.backbone.startswith("vlp-world") and not r.dataset.startswith("world-")
    ]
    if off_world:  # a toy-world backbone on real data (run/backbone.py)
        from vlprompt.run.backbone import WORLD_BANNER

        lines += [f"> **⚠ {WORLD_BANNER}.** ({len(off_world)} run(s).)", ""]
    lines += [
        f"Runs directory: `{runs_dir}` · {len(complete)} complete run(s) · "
        f"backbone(s): {', '.join(backbones)}",
        "",
    ]
    if any(r.method.lower().startswith("dpl") for r in complete):
        lines += [
            f"DPL is {DPL_NOTE[1:-1]}: its method section is not available offline (see docs/dpl.md).",
            "",
        ]
    if reference:
        lines += [
            f"**({PUB})** marks numbers printed in the methods' papers ({ref.LABEL}, 16 shots, mean of 3 "
            "seeds): not produced by this package. Averages beside ours cover the same data sets."
            + (
                f" These runs use {', '.join(backbones)}: do not read the difference as a result."
                if any("ViT-B-16" not in b or "random" in b for b in backbones)
                else ""
            ),
            "",
        ]
    for title, ts in sections:
        lines += [f"## {title}", ""] + [t.markdown() for t in ts]
    if other:
        lines += [f"Runs with protocols not tabulated: {', '.join(other)}", ""]
    lines += learned_nothing_lines(complete)
    if incomplete:
        lines += ["## Failed and incomplete runs (not in the tables)", ""]
        for r in incomplete:
            if r.error:
                lines.append(f"- `{r.path}`: **failed**: {r.error}")
            elif not r.done:
                lines.append(f"- `{r.path}`: not finished (no `done` file: interrupted or still running)")
            else:
                lines.append(f"- `{r.path}`: no evaluation recorded in metrics.json")
        lines.append("")

    out_dir.mkdir(parents=True, exist_ok=True)
    csvs = []
    for t in tables:
        p = out_dir / f"{t.name}.csv"
        atomic_write_text(p, t.csv())
        csvs.append(p)
    per_run = out_dir / "runs.csv"
    atomic_write_text(per_run, _runs_csv(complete))
    csvs.append(per_run)

    pngs: list[Path] = []
    if plots:
        pngs = _plots(complete, b2n_summaries, fs_summary, out_dir / "plots", reference)
        if pngs:
            lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in pngs] + [""]
    md = out_dir / "report.md"
    atomic_write_text(md, "\n".join(lines).rstrip() + "\n")
    return ReportResult(md, csvs, pngs, tables, len(complete), bool(random_runs))


def learned_nothing_lines(runs: Sequence[RunRecord]) -> list[str]:
    """A section naming the runs that learned nothing (run/learned.py), one line each."""
    from vlprompt.run.learned import read_warning

    found = [(r, read_warning(r.path)) for r in runs]
    found = [(r, w) for r, w in found if w]
    if not found:
        return []
    return ["## Runs that learned nothing", "", *(f"- {_run_name(r)}: {w}" for r, w in found), ""]


def reconstruction_note(method: str) -> str:
    """The method's own note when it is a reconstruction (DPL), else ``""``."""
    try:
        from vlprompt.methods import get_method

        return get_method(method).reconstruction_note
    except Exception:  # a method not registered in this installation
        return "reconstructed from the paper's abstract" if method.lower().startswith("dpl") else ""


def _runs_csv(runs: list[RunRecord]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "protocol",
            "method",
            "reconstructed",
            "train_dataset",
            "shots",
            "seed",
            "eval_dataset",
            "subsample",
            "accuracy",
            "macro_f1",
            "n",
            "backbone",
            "run_dir",
        ]
    )
    for r in runs:
        note = reconstruction_note(r.method)
        for e in r.evaluations:
            w.writerow(
                [
                    r.protocol,
                    r.method,
                    note,
                    r.dataset,
                    r.shots,
                    r.seed,
                    e.get("dataset"),
                    e.get("subsample"),
                    _csv_cell(_num(e.get("accuracy"))),
                    _csv_cell(_num(e.get("macro_f1"))),
                    e.get("n"),
                    r.backbone,
                    str(r.path),
                ]
            )
    return buf.getvalue()


def _plots(
    runs: list[RunRecord], b2n: dict[str, Any], fs: dict[str, Any], out_dir: Path, reference: bool = False
) -> list[Path]:
    from vlprompt.protocols import plots

    paths: list[Path] = []
    random = " (random backbone: pipeline check)" if any(r.random_backbone for r in runs) else ""
    all_shots = {s for _, s in b2n}
    bars: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (method, shots), (rows, avg) in sorted(
        b2n.items(), key=lambda kv: (method_key(kv[0][0]), kv[0][1] or 0)
    ):
        label = method_label(method) + _suffix(shots, all_shots)
        paper = ref.paper_name(method) if reference else None
        for row in rows:
            pub = None
            if paper:
                bn = ref.BASE2NEW_BN.get(paper, {}).get(row.dataset)
                pub = (
                    bn[0] if bn else None,
                    bn[1] if bn else None,
                    ref.BASE2NEW_HM.get(paper, {}).get(row.dataset),
                )
            bars[dataset_title(row.dataset)][label] = {
                "values": (row.base.mean if row.base else None, row.new.mean if row.new else None, row.hm),
                "std": (row.base.std if row.base else None, row.new.std if row.new else None, None),
                "published": pub if pub and any(v is not None for v in pub) else None,
            }
        if avg:
            covered = [x.dataset for x in rows if x.base is not None and x.new is not None]
            pub = published_base2new_average(paper, covered)[0] if paper else None
            bars["Average"][label] = {"values": avg, "std": None, "published": pub}
    paths += plots.base2new_bars(bars, out_dir, random)
    curves = {
        dataset_title(d): {
            method_label(m): [(k, ms.mean, ms.std) for k, ms in per_k.items()] for m, per_k in pm.items()
        }
        for d, pm in fs.items()
    }
    paths += plots.fewshot_curves(curves, out_dir, random)
    train: dict[str, dict[str, list[Any]]] = defaultdict(dict)
    for r in runs:
        pts = read_epoch_curve(r.path)
        if pts:
            train[f"{r.protocol} {method_label(r.method)} {r.dataset}"][f"shots {r.shots}, seed {r.seed}"] = (
                pts
            )
    paths += plots.training_curves(train, out_dir)
    from vlprompt.train.evaluate import dense_confusion

    for r in runs:
        for e in r.evaluations:
            conf = e.get("confusion")
            if not conf or not conf.get("classes"):
                continue
            sub = e.get("subsample", "all")
            title = (
                f"{_run_name(r)}\non {dataset_title(str(e.get('dataset')))} ({sub}): "
                f"accuracy {_num(e.get('accuracy')) or 0:.2f}%, {e.get('n')} images{random}"
            )
            name = f"confusion_{_slug_name(r)}_{e.get('dataset')}_{sub}.png"
            paths.append(
                plots.confusion_matrix(dense_confusion(conf).tolist(), conf["classes"], title, out_dir / name)
            )
    return paths


def _slug_name(r: RunRecord) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{r.protocol}_{r.method}_{r.dataset}_s{r.shots}_seed{r.seed}")
