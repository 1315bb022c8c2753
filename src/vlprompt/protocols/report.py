"""The report: report.md, one CSV per table and the PNG plots, built only from run-directory files.

Three steps, one module each: ``records`` reads the run directories (``config.yaml``,
``metrics.json``, ``log.jsonl``, ``manifest.json`` / ``env.json``; console logs are never parsed),
``tables`` turns records into the papers' tables (see its docstring for the averaging rules), and
this module renders them (Markdown, CSV, plots through ``plots``).  Display names live in
``display``.  The names below are re-exported so ``vlprompt.protocols.report`` stays the one import.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlprompt.errors import VlpromptError
from vlprompt.protocols import plots
from vlprompt.protocols import reference as ref
from vlprompt.protocols.cost_report import LINK, write_cost_report  # machine-dependent: own page
from vlprompt.protocols.display import (
    DPL_NOTE,
    dataset_order,
    dataset_title,
    method_key,
    method_label,
    reconstruction_note,
    transductive_note,
)
from vlprompt.protocols.records import (
    MOST_CONFUSED,
    SINGLE,
    RunRecord,
    collect_runs,
    load_run_record,
    most_confused,
    read_epoch_curve,
    read_training_curve,
)
from vlprompt.protocols.tables import (
    PUB,
    Base2NewRow,
    MeanStd,
    Table,
    _base2new_tables,
    _confusion_table,
    _fewshot_tables,
    _num,
    _run_name,
    _runs_csv,
    _single_table,
    _suffix,
    _transfer_tables,
    base2new_summary,
    fewshot_summary,
    harmonic_mean,
    mean_std,
    published_base2new_average,
)
from vlprompt.run.backbone import WORLD_BANNER
from vlprompt.run.learned import read_warning
from vlprompt.train.evaluate import dense_confusion
from vlprompt.utils import atomic_write_text

log = logging.getLogger(__name__)

RANDOM_BANNER = "untrained (random) backbone: numbers are a pipeline check, not CLIP results"

__all__ = [
    "RANDOM_BANNER",
    "DPL_NOTE",
    "PUB",
    "SINGLE",
    "MOST_CONFUSED",
    "Base2NewRow",
    "MeanStd",
    "ReportResult",
    "RunRecord",
    "Table",
    "base2new_summary",
    "build_report",
    "collect_runs",
    "dataset_order",
    "dataset_title",
    "fewshot_summary",
    "grid_summary",
    "harmonic_mean",
    "load_run_record",
    "mean_std",
    "method_label",
    "most_confused",
    "published_base2new_average",
    "read_epoch_curve",
    "read_training_curve",
    "reconstruction_note",
    "render_text",
]


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
    complete = [r for r in records if r.done and r.evaluations and (not r.error or r.partial)]
    incomplete = [r for r in records if r not in complete or r.partial]
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
            ["Method", f"Base ({PUB})", f"New ({PUB})", f"HM ({PUB})", f"Shots ({PUB})"],
            [[name, *v, ref.PUBLISHED_SHOTS] for name, v in ref.BASE2NEW_AVERAGE.items()],
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
        lines += [f"> **⚠ {WORLD_BANNER}.** ({len(off_world)} run(s).)", ""]
    lines += [
        f"Runs directory: `{runs_dir}` · {len(complete)} complete run(s) · "
        f"backbone(s): {', '.join(backbones)}",
        "",
    ]
    notes = {reconstruction_note(r.method) for r in complete} - {""}
    for note in sorted(notes):  # e.g. DPL: its method section is not available offline (see docs/dpl.md)
        lines += [f"{note}: its numbers come from our reading of the paper, not from published code.", ""]
    for note in sorted({transductive_note(r.method) for r in complete} - {""}):  # e.g. PromptKD
        lines += [f"**Transductive:** {note}; its rows are not comparable to inductive ones.", ""]
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
    for title, ts in sections:  # a section holding one table of the same title: no second heading
        lines += [f"## {title}", ""] + [
            t.markdown(heading=not (len(ts) == 1 and t.title == title)) for t in ts
        ]
    if other:
        lines += [f"Runs with protocols not tabulated: {', '.join(other)}", ""]
    lines += learned_nothing_lines(complete)
    if incomplete:
        lines += ["## Failed and incomplete runs (not in the tables, except where said)", ""]
        for r in incomplete:
            if r.partial:
                lines.append(
                    f"- `{r.path}`: **some evaluations failed** (the others are in the tables): {r.error}"
                )
            elif r.error:
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
    write_cost_report(complete, out_dir, plots=plots)
    lines += [LINK]
    md = out_dir / "report.md"
    atomic_write_text(md, "\n".join(lines).rstrip() + "\n")
    return ReportResult(md, csvs, pngs, tables, len(complete), bool(random_runs))


def _plots(
    runs: list[RunRecord], b2n: dict[str, Any], fs: dict[str, Any], out_dir: Path, reference: bool = False
) -> list[Path]:
    paths: list[Path] = []
    random = " (random backbone: pipeline check)" if any(r.random_backbone for r in runs) else ""
    all_shots = {s for _, s in b2n}
    bars: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (method, shots), (rows, avg, covered) in sorted(
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
        if avg:  # the comparison table's Average: over the data sets every method ran (`covered`)
            pub = published_base2new_average(paper, covered)[0] if paper else None
            bars["Average"][label] = {"values": avg, "std": None, "published": pub}
    if len([d for d in bars if d != "Average"]) < 2:
        bars.pop("Average", None)  # the average of one data set is that data set's chart again
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
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{r.protocol}_{r.method}_{r.dataset}_s{r.shots}_seed{r.seed}")


# ---------------------------------------------------------------------------------------- console
def render_text(table: Table) -> str:
    """A table as aligned plain text (what a terminal shows at the end of `vlprompt run`)."""

    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    cells = [[fmt(c) for c in table.columns]] + [[fmt(v) for v in row] for row in table.rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(table.columns))]
    numeric = [
        i > 0 and all(isinstance(r[i], (int, float, MeanStd)) or r[i] is None for r in table.rows)
        for i in range(len(table.columns))
    ]
    lines = [table.title]
    for k, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def grid_summary(run_dirs: Iterable[str | Path]) -> str | None:
    """The grid's table (seed means, HM; a zero-shot row when the grid has one) for the console.

    ``run_dirs``: the grid's run directories; only complete runs among them are tabulated.
    """
    records = [r for d in run_dirs if (r := load_run_record(d)) is not None]
    complete = [r for r in records if r.done and r.evaluations and not r.error]
    if not complete:
        return None
    by_protocol: dict[str, list[RunRecord]] = defaultdict(list)
    for r in complete:
        by_protocol[r.protocol].append(r)
    tables: list[Table] = []
    for proto, runs in by_protocol.items():
        if proto == "base2new":
            tables += [_base2new_console(runs)]
        elif proto in ("cross-dataset", "dg"):
            tables += _transfer_tables(runs, proto, False)
        elif proto == "fewshot":
            tables += _fewshot_tables(runs)[0]
    return "\n\n".join(render_text(t) for t in tables) or None


def _base2new_console(runs: list[RunRecord]) -> Table:
    all_shots = {r.shots for r in runs}
    groups: dict[tuple[str, Any], list[RunRecord]] = defaultdict(list)
    for r in runs:
        groups[(r.method, r.shots)].append(r)
    order = sorted(groups, key=lambda k: (k[0] != "zeroshot", k[0], k[1] or 0))
    body: list[list[Any]] = []
    for method, shots in order:
        rows, avg = base2new_summary(groups[(method, shots)])
        label = method_label(method) + _suffix(shots, all_shots)
        for row in rows:
            n = max(row.base.n if row.base else 0, row.new.n if row.new else 0)
            body.append([label, dataset_title(row.dataset), row.base, row.new, row.hm, n])
        if avg is not None and len(rows) > 1:
            body.append([label, f"Average ({len(rows)} data sets)", *avg, None])
    return Table(
        "grid",
        "Base-to-new (top-1 %, mean ± std over seeds; HM of the seed means)",
        ["Method", "Data set", "Base", "New", "HM", "seeds"],
        body,
    )


def learned_nothing_lines(runs: Sequence[RunRecord]) -> list[str]:
    """A section naming the runs that learned nothing (run/learned.py), one line each."""
    found = [(r, read_warning(r.path)) for r in runs]
    found = [(r, w) for r, w in found if w]
    if not found:
        return []
    return ["## Runs that learned nothing", "", *(f"- {_run_name(r)}: {w}" for r, w in found), ""]
