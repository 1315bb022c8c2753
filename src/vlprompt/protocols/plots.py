"""PNG figures for the report (matplotlib, Agg backend: no display needed).

Each function takes plain numbers already aggregated by :mod:`vlprompt.protocols.report` and writes
one file per figure, returning the paths written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    """Lay out, write as PNG and close ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80] or "plot"


def base2new_bars(
    data: Mapping[str, Mapping[str, tuple[float | None, float | None, float | None]]],
    out_dir: str | Path,
    title_suffix: str = "",
) -> list[Path]:
    """One bar chart per data set: Base / New / HM groups with one bar per method.

    ``data[dataset][method_label] = (base, new, hm)`` (seed means, %; None where missing).
    """
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for dataset, per_method in data.items():
        labels = list(per_method)
        if not labels:
            continue
        fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 1.1 * len(labels)), 3.8))
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            vals = [v if v is not None else 0.0 for v in per_method[label]]
            xs = [g + (i - (len(labels) - 1) / 2) * width for g in range(3)]
            bars = ax.bar(xs, vals, width, label=label)
            for b, v in zip(bars, per_method[label]):
                if v is not None:
                    ax.annotate(
                        f"{v:.1f}",
                        (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                    )
        ax.set_xticks(range(3), ["Base", "New", "HM"])
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_ylim(0, 105)
        ax.set_title(
            f"base-to-new: {dataset}" + (f"\n{title_suffix.strip()}" if title_suffix else ""), fontsize=9
        )
        ax.legend(fontsize=7, loc="lower right")
        paths.append(_save(plt, fig, out_dir / f"base2new_{_slug(dataset)}.png"))
    return paths


def fewshot_curves(
    data: Mapping[str, Mapping[str, Sequence[tuple[int, float, float]]]],
    out_dir: str | Path,
    title_suffix: str = "",
) -> list[Path]:
    """One accuracy-vs-shots figure per data set; ``data[dataset][method_label] = [(K, mean, std)]``."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for dataset, per_method in data.items():
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        all_k: set[int] = set()
        for label, points in per_method.items():
            points = sorted(points)
            ks = [p[0] for p in points]
            all_k.update(ks)
            ax.errorbar(
                ks, [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3, label=label
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(all_k), [str(k) for k in sorted(all_k)])
        ax.set_xlabel("shots per class (K)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(
            f"few-shot: {dataset}" + (f"\n{title_suffix.strip()}" if title_suffix else ""), fontsize=9
        )
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        paths.append(_save(plt, fig, out_dir / f"fewshot_{_slug(dataset)}.png"))
    return paths


def training_curves(
    curves: Mapping[str, Mapping[str, Sequence[tuple[float, float | None, float | None]]]],
    out_dir: str | Path,
) -> list[Path]:
    """Loss and training accuracy vs step; ``curves[figure_title][run_label] = [(step, loss, acc)]``."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for title, runs in curves.items():
        fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(9, 3.5))
        for label, pts in runs.items():
            loss = [(s, lo) for s, lo, _ in pts if lo is not None]
            acc = [(s, a) for s, _, a in pts if a is not None]
            marker = "o" if len(pts) < 30 else None  # a short run must still show its points
            if loss:
                ax_l.plot(*zip(*loss), label=label, marker=marker)
            if acc:
                ax_a.plot(*zip(*acc), label=label, marker=marker)
        ax_l.set_xlabel("step")
        ax_l.set_ylabel("training loss")
        ax_a.set_xlabel("step")
        ax_a.set_ylabel("training accuracy (%)")
        for ax in (ax_l, ax_a):
            ax.grid(alpha=0.3)
        ax_l.legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        paths.append(_save(plt, fig, out_dir / f"train_{_slug(title)}.png"))
    return paths
