"""The report's cost page: what each method x protocol cost on the machines that ran it.

Reads ``metrics.json["cost"]`` (training) and each evaluation's ``"cost"`` (run/cost.py) of the
complete runs and writes ``cost.md``, ``cost.csv`` and ``plots/cost.png`` beside report.md. The
numbers depend on the machine, its load and the executor, so they live on their own page: report.md
only links to it and stays identical whichever executor produced the runs. Runs recorded before
costs were kept are counted under "runs" but add nothing to the sums.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlprompt.run.layout import METRICS, RunDir
from vlprompt.utils import atomic_write_text

COLUMNS = [
    "protocol", "method", "runs", "runs_with_cost", "train_wall_s", "train_cpu_s", "steps",
    "train_images", "train_images_per_s", "eval_wall_s", "eval_cpu_s", "eval_images", "eval_images_per_s",
    "peak_rss_mb", "peak_gpu_mb", "devices",
]  # fmt: skip


@dataclass
class CostRow:
    protocol: str
    method: str
    runs: int = 0
    with_cost: int = 0
    train_wall: float = 0.0
    train_cpu: float = 0.0
    steps: int = 0
    train_images: int = 0
    train_loop: float = 0.0
    eval_wall: float = 0.0
    eval_cpu: float = 0.0
    eval_images: int = 0
    eval_timed: float = 0.0
    peak_rss: float | None = None
    peak_gpu: float | None = None
    devices: set[str] = field(default_factory=set)

    def add(self, metrics: dict[str, Any]) -> None:
        self.runs += 1
        cost = (metrics.get("cost") or {}).get("train") if isinstance(metrics.get("cost"), dict) else None
        evals = [e.get("cost") for e in metrics.get("evaluations") or [] if isinstance(e, dict)]
        evals = [c for c in evals if isinstance(c, dict)]
        if not isinstance(cost, dict) and not evals:
            return
        self.with_cost += 1
        if isinstance(cost, dict):
            own_eval = float(cost.get("eval_s") or 0.0)  # the trainer's final evaluation is inside wall_s
            self.train_wall += max(0.0, float(cost.get("wall_s") or 0.0) - own_eval)
            self.train_cpu += float(cost.get("cpu_s") or 0.0)
            self.steps += int(cost.get("steps") or 0)
            self.train_images += int(cost.get("images") or 0)
            self.train_loop += float(cost.get("loop_s") or 0.0)
            self._peaks(cost)
            if cost.get("device"):
                self.devices.add(str(cost["device"]))
        for c in evals:
            self.eval_wall += float(c.get("wall_s") or 0.0)
            self.eval_cpu += float(c.get("cpu_s") or 0.0)
            self.eval_images += int(c.get("images") or 0)
            self.eval_timed += float(c.get("wall_s") or 0.0)
            self._peaks(c)

    def _peaks(self, c: dict[str, Any]) -> None:
        for key, attr in (("peak_rss_mb", "peak_rss"), ("peak_gpu_mb", "peak_gpu")):
            v = c.get(key)
            if v is not None:
                old = getattr(self, attr)
                setattr(self, attr, float(v) if old is None else max(old, float(v)))

    def merge(self, other: CostRow) -> None:
        for name in ("runs", "with_cost", "train_wall", "train_cpu", "steps", "train_images", "train_loop",
                     "eval_wall", "eval_cpu", "eval_images", "eval_timed"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for attr in ("peak_rss", "peak_gpu"):
            a, b = getattr(self, attr), getattr(other, attr)
            setattr(self, attr, b if a is None else a if b is None else max(a, b))
        self.devices |= other.devices

    def values(self) -> list[Any]:
        def rate(n: float, s: float) -> float | None:
            return round(n / s, 2) if s > 0 else None

        return [
            self.protocol, self.method, self.runs, self.with_cost, round(self.train_wall, 3),
            round(self.train_cpu, 3), self.steps, self.train_images, rate(self.train_images, self.train_loop),
            round(self.eval_wall, 3), round(self.eval_cpu, 3), self.eval_images,
            rate(self.eval_images, self.eval_timed), self.peak_rss, self.peak_gpu,
            ",".join(sorted(self.devices)),
        ]  # fmt: skip


def duration(seconds: float) -> str:
    """12.3 s, 4.5 min, 2.25 h."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def cost_rows(runs: Sequence[Any]) -> tuple[list[CostRow], CostRow]:
    """One row per (protocol, method) over ``runs`` (report RunRecords: ``path``, ``protocol``,
    ``method``) and the total."""

    rows: dict[tuple[str, str], CostRow] = defaultdict(lambda: CostRow("", ""))
    for r in runs:
        key = (str(r.protocol), str(r.method))
        row = rows[key]
        row.protocol, row.method = key
        try:
            metrics = RunDir(r.path).read_json(METRICS, {}) or {}
        except Exception:  # a damaged metrics.json is the accuracy tables' problem, not the bill's
            metrics = {}
        row.add(metrics if isinstance(metrics, dict) else {})
    ordered = [rows[k] for k in sorted(rows)]
    total = CostRow("all", "all")
    for row in ordered:
        total.merge(row)
    return ordered, total


def _markdown(rows: list[CostRow], total: CostRow, plot: Path | None) -> str:
    head = ["Protocol", "Method", "Runs", "Train wall", "Train CPU", "Steps", "Train img/s",
            "Eval wall", "Eval img/s", "Peak RSS (MB)", "Peak GPU (MB)", "Devices"]  # fmt: skip

    def cells(r: CostRow) -> list[str]:
        v = dict(zip(COLUMNS, r.values(), strict=True))
        runs = f"{r.runs}" if r.with_cost == r.runs else f"{r.runs} ({r.with_cost} with cost)"

        def num(x: Any, fmt: str = "{:.1f}") -> str:
            return "–" if x is None else fmt.format(x)

        return [
            r.protocol, r.method, runs, duration(r.train_wall), duration(r.train_cpu), f"{r.steps}",
            num(v["train_images_per_s"]), duration(r.eval_wall), num(v["eval_images_per_s"]),
            num(r.peak_rss, "{:.0f}"), num(r.peak_gpu, "{:.0f}"), v["devices"] or "–",
        ]  # fmt: skip

    lines = [
        "# Cost of the runs",
        "",
        "Measured by each run on the machine that ran it (`metrics.json` → `cost`; see docs/scaling.md). "
        "Wall and CPU times are sums over runs; *Train wall* excludes the evaluation that ends training "
        "(counted under *Eval wall*); img/s is images over the seconds spent in the training loop / the "
        "evaluations; *Train CPU* includes that evaluation; peaks are the largest of any run. "
        "A resumed run's wall and CPU time cover only the "
        "attempt that finished.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    tot = cells(total)
    lines.append("| " + " | ".join(f"**{c}**" for c in tot) + " |")
    wall, cpu = duration(total.train_wall + total.eval_wall), duration(total.train_cpu + total.eval_cpu)
    lines += ["", f"Total: {wall} of run time, {cpu} of CPU time, {total.runs} runs.", ""]
    if plot is not None:
        lines += [f"![cost](plots/{plot.name})", ""]
    return "\n".join(lines)


def _csv(rows: list[CostRow], total: CostRow) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in [*rows, total]:
        w.writerow(["" if v is None else v for v in r.values()])
    return buf.getvalue()


def _plot(rows: list[CostRow], path: Path) -> Path | None:
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.method}\n{r.protocol}" for r in rows]
    train = [r.train_wall for r in rows]
    ev = [r.eval_wall for r in rows]
    top = max([a + b for a, b in zip(train, ev, strict=True)] + [1e-9])
    unit, div = ("h", 3600.0) if top >= 3 * 3600 else ("min", 60.0) if top >= 180 else ("s", 1.0)
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(rows) + 1.6))
    y = list(range(len(rows)))
    ax.barh(y, [t / div for t in train], color="#4c72b0", label="training")
    ax.barh(y, [e / div for e in ev], left=[t / div for t in train], color="#dd8452", label="evaluation")
    for i, r in enumerate(rows):
        ax.text((train[i] + ev[i]) / div, i, f"  {r.runs} runs", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"wall time summed over runs ({unit})")
    ax.set_xlim(0, top / div * 1.25)
    ax.set_title("cost per method × protocol", fontsize=9, loc="right")
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_cost_report(runs: Sequence[Any], out_dir: str | Path, plots: bool = True) -> list[Path]:
    """cost.md, cost.csv (and plots/cost.png) in ``out_dir``; returns the files written."""
    out_dir = Path(out_dir)
    rows, total = cost_rows(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = _plot(rows, out_dir / "plots" / "cost.png") if plots else None
    atomic_write_text(out_dir / "cost.csv", _csv(rows, total))
    atomic_write_text(out_dir / "cost.md", _markdown(rows, total, png))
    return [out_dir / "cost.md", out_dir / "cost.csv", *([png] if png else [])]


#: the line report.md carries (the same for every executor and machine)
LINK = (
    "## Cost\n\nWall time, CPU time, memory and throughput per method × protocol, measured on the "
    "machines that ran them: [cost.md](cost.md) (kept out of this page because it depends on the machine)."
    "\n"
)
