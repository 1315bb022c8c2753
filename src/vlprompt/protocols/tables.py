"""Tables (Markdown + CSV) in the papers' layout, built from run records.

Numbers are the papers' convention: accuracy of the last epoch, mean and (population) standard
deviation over seeds; per data set HM = HM of the seed-averaged Base and New; the base-to-new
"Average" row is HM(mean Base, mean New) over data sets, not the mean of per-data-set HMs;
cross-dataset / DG averages are plain means over the targets.  Published numbers (``--reference``)
are compared like with like: beside an average over our data sets stands the published average over
the *same* data sets, never the papers' 11-data-set average.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlprompt.data import BENCHMARKS, CROSS_DATASET_TARGETS, DG_TARGETS
from vlprompt.protocols import reference as ref
from vlprompt.protocols.display import (
    dataset_order,
    dataset_title,
    method_key,
    method_label,
    reconstruction_note,
)
from vlprompt.protocols.records import MOST_CONFUSED, RunRecord, _num

PUB = "pub."  # column marker of published numbers; the report explains it once


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


# ---------------------------------------------------------------------------------------- tables
@dataclass
class Table:
    """A titled table; cells are str, float, MeanStd or None. ``name`` is the CSV file stem."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)

    def markdown(self, heading: bool = True) -> str:
        """The table in Markdown; ``heading=False`` leaves out its ``###`` title (a section says it)."""

        def fmt(v: Any) -> str:
            if v is None:
                return "–"
            if isinstance(v, float):
                return f"{v:.2f}"
            return str(v).replace("|", "\\|")

        lines = [f"### {self.title}", ""] if heading else []
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


def _unpublished_note(method: str, datasets: Sequence[str]) -> str | None:
    """Why a method has no published number beside ours on ``datasets`` (None when it has some)."""
    paper = ref.paper_name(method)
    if paper is None:
        return f"{method_label(method)}: no published base-to-new numbers (its paper reports none we store)."
    have = ref.BASE2NEW_HM.get(paper, {})
    if any(d in have for d in datasets):
        return None
    where = (
        "only the 11-data-set average is stored (see Published reference numbers)"
        if paper in ref.BASE2NEW_AVERAGE
        else "none is stored"
    )
    return f"{paper} ({PUB}): no per-data-set number for these data sets; {where}."


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
        summaries[(method, shots)] = (rows, avg, None)
        paper = ref.paper_name(method) if reference else None
        cols = ["Data set", "Base", "New", "HM", "seeds"]
        if paper:
            cols += ["Shots", f"Base ({PUB})", f"New ({PUB})", f"HM ({PUB})", f"Shots ({PUB})"]
        body = []
        for row in rows:
            n = max(row.base.n if row.base else 0, row.new.n if row.new else 0)
            line: list[Any] = [dataset_title(row.dataset), row.base, row.new, row.hm, n]
            if paper:
                line.append(shots)
                bn = ref.BASE2NEW_BN.get(paper, {}).get(row.dataset)
                line += [
                    bn[0] if bn else None,
                    bn[1] if bn else None,
                    ref.BASE2NEW_HM.get(paper, {}).get(row.dataset),
                    ref.PUBLISHED_SHOTS,
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
                line += [shots, *(list(pub) if pub else [None, None, None]), ref.PUBLISHED_SHOTS]
                notes.append(f"Average ({PUB}): over the same {len(covered)} data set(s) -- {how}.")
                if paper in ref.PUBLISHED_NOTES:
                    notes.append(f"{paper} ({PUB}): {ref.PUBLISHED_NOTES[paper]}.")
            body.append(line)
        if reference:
            missing = _unpublished_note(method, [row.dataset for row in rows])
            if missing:
                notes.append(missing)
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
        cols = ["Data set"] + (["Shots", f"Shots ({PUB})"] if reference else [])
        for m in present:
            cols += [f"{method_label(m)} Base", f"{method_label(m)} New", f"{method_label(m)} HM"]
            if reference and ref.paper_name(m):
                cols.append(f"{ref.paper_name(m)} HM ({PUB})")
        datasets = dataset_order({row.dataset for m in present for row in summaries[(m, shots)][0]})
        # the Average row compares like with like: over the data sets every method here has Base and New on
        covered_by = {
            m: {x.dataset for x in summaries[(m, shots)][0] if x.base is not None and x.new is not None}
            for m in present
        }
        common = set.intersection(*covered_by.values())
        uneven = any(c != common for c in covered_by.values())
        avgs = {
            m: base2new_summary([r for r in groups[(m, shots)] if r.dataset in common])[1]
            if uneven
            else summaries[(m, shots)][1]
            for m in present
        }
        for m in present:  # what the plots' Average bars show: the comparison's Average, over `common`
            summaries[(m, shots)] = (summaries[(m, shots)][0], avgs[m], dataset_order(common))
        body = []
        for d in [*datasets, "__avg__"]:
            line: list[Any] = ["Average" if d == "__avg__" else dataset_title(d)]
            if reference:
                line += [shots, ref.PUBLISHED_SHOTS]
            for m in present:
                rows, avg = summaries[(m, shots)][0], avgs[m]
                covered = [d2 for d2 in datasets if d2 in common]
                if d == "__avg__":
                    line += list(avg) if avg else [None, None, None]
                else:
                    row = next((x for x in rows if x.dataset == d), None)
                    line += [
                        row.base.mean if row and row.base else None,
                        row.new.mean if row and row.new else None,
                        row.hm if row else None,
                    ]
                if reference and ref.paper_name(m):
                    p = ref.paper_name(m)
                    if d == "__avg__":
                        pub, _ = published_base2new_average(p, covered)
                        line.append(pub[2] if pub else None)
                    else:
                        line.append(ref.BASE2NEW_HM.get(p, {}).get(d))
            body.append(line)
        if not uneven:
            notes = ["Average row: HM(mean Base, mean New) over the data sets above (every method ran all)."]
        elif common:
            names = ", ".join(dataset_title(d) for d in dataset_order(common))
            notes = [
                f"Average row: HM(mean Base, mean New) over the {len(common)} data set(s) every method in "
                f"this table ran ({names}), so that the methods are compared on the same data; each method's "
                "own table averages over all of its data sets."
            ]
        else:
            notes = ["Average row: empty, as no data set was run by every method in this table."]
        if reference:
            notes.append(f"HM ({PUB}) in the Average row: over the same data sets as the Average row.")
            notes += [n for m in present if (n := _unpublished_note(m, datasets))]
            notes += [
                f"{p} ({PUB}): {ref.PUBLISHED_NOTES[p]}."
                for m in present
                if (p := ref.paper_name(m)) in ref.PUBLISHED_NOTES
            ]
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
    with_pub = reference and not [t for t in standard if t not in targets]
    if with_pub:
        cols.insert(1, "Shots")
    body = []
    for (method, shots), rs in sorted(groups.items(), key=lambda kv: (method_key(kv[0][0]), kv[0][1] or 0)):
        line: list[Any] = [method_label(method) + _suffix(shots, all_shots)]
        if with_pub:
            line.append(shots)
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
    if missing and any(t in standard for t in targets):  # a partial real suite (not e.g. the world's)
        notes.append(
            f"Not evaluated (missing from metrics.json): {', '.join(missing)}; the average is not "
            "comparable to the papers' average over all targets."
        )
    if reference and not missing:  # like with like: the papers average over all standard targets
        pub = ref.CROSS_DATASET_AVERAGE if protocol == "cross-dataset" else ref.DG_AVERAGE
        for name, avg in pub.items():
            body.append([f"{name} ({PUB})", ref.PUBLISHED_SHOTS] + [None] * (len(cols) - 3) + [avg])
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


def _confusion_table(runs: Sequence[RunRecord]) -> Table | None:
    """The most confused pairs per (method, training set, shots, evaluation), counts summed over seeds.

    One block per evaluation of each grid cell instead of one per run: seeds of one setting confuse
    the same classes, and listing them run by run repeats near-identical rows.
    """
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in runs:
        for e in r.evaluations:
            conf = e.get("confusion") or {}
            classes = conf.get("classes") or []
            if not classes:
                continue
            key = (
                r.protocol,
                r.method,
                r.dataset,
                r.shots or 0,
                str(e.get("dataset")),
                e.get("subsample", "all"),
            )
            g = groups.setdefault(key, {"off": defaultdict(int), "support": defaultdict(int), "seeds": set()})
            g["order"] = {c: k for k, c in enumerate(classes)}
            for i, j, n in conf.get("counts") or []:
                g["support"][classes[int(i)]] += int(n)
                if int(i) != int(j) and int(n) > 0:
                    g["off"][(classes[int(i)], classes[int(j)])] += int(n)
            g["seeds"].add(r.seed)
    body = []
    for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
        _, method, trained, shots, evaluated, sub = key
        g = groups[key]
        order = g["order"]
        pairs = sorted(
            g["off"].items(), key=lambda kv: (-kv[1], order.get(kv[0][0], 0), order.get(kv[0][1], 0))
        )
        seeds = sorted(g["seeds"], key=lambda x: (x is None, x))
        name = f"{method_label(method)} · {trained} · shots {shots}"
        for (true, pred), n in pairs[:MOST_CONFUSED]:
            pct = 100.0 * n / max(g["support"][true], 1)
            body.append(
                [name, f"{dataset_title(evaluated)} ({sub})", true, pred, n, pct, ", ".join(map(str, seeds))]
            )
    if not body:
        return None
    return Table(
        "most_confused",
        "Most confused pairs",
        ["Run", "Evaluated on", "True class", "Predicted as", "images", "% of true class", "seeds"],
        body,
        [
            f"Per method, training set, shots and evaluation: the {MOST_CONFUSED} largest off-diagonal cells "
            "of the confusion counts summed over the seeds listed (images), as % of the true class's images."
        ],
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
