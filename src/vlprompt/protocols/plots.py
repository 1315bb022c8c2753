"""PNG figures for the report (matplotlib, Agg backend: no display needed).

Each function takes plain numbers already aggregated by :mod:`vlprompt.protocols.report` and writes
one file per figure, returning the paths written.  Legends sit outside the axes (they never cover
data); published numbers, where given, are black markers with one legend entry.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PUBLISHED_LEGEND = "published (ViT-B/16, pretrained CLIP)"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    """Write as PNG (the bounding box grown to include outside legends) and close ``fig``."""
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80] or "plot"


def _outside_legend(ax, **kw: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, **kw)


def _group(entry: Any) -> dict[str, Any]:
    """A bar group as ``{"values": (b, n, hm), "std": (sb, sn, None), "published": (pb, pn, ph)|None}``."""
    if isinstance(entry, Mapping):
        return {
            "values": tuple(entry["values"]),
            "std": entry.get("std"),
            "published": entry.get("published"),
        }
    return {"values": tuple(entry), "std": None, "published": None}


def base2new_bars(
    data: Mapping[str, Mapping[str, Any]],
    out_dir: str | Path,
    title_suffix: str = "",
) -> list[Path]:
    """One bar chart per data set: Base / New / HM groups with one bar per method.

    ``data[dataset][method_label]`` is ``{"values": (base, new, hm), "std": (sb, sn, None),
    "published": (pb, pn, ph) or None}`` (seed means / stds in %, None where missing) or just the
    ``(base, new, hm)`` tuple.  Seed stds are error bars; published numbers are black markers.
    """
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for dataset, per_method in data.items():
        labels = list(per_method)
        if not labels:
            continue
        fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 1.2 * len(labels)), 4.2))
        width = 0.8 / len(labels)
        upright = len(labels) > 2  # narrow bars: labels turned upright so that neighbours never overlap
        shown_pub = False
        top = 0.0
        for i, label in enumerate(labels):
            g = _group(per_method[label])
            vals = [v if v is not None else 0.0 for v in g["values"]]
            std = g["std"] or (None, None, None)
            err = [s if (s is not None and g["values"][k] is not None) else 0.0 for k, s in enumerate(std)]
            xs = [k + (i - (len(labels) - 1) / 2) * width for k in range(3)]
            bars = ax.bar(xs, vals, width, label=label, yerr=err if any(err) else None, capsize=2)
            top = max([top, *(v + e for v, e in zip(vals, err))])
            marks = g["published"] or (None, None, None)
            for b, v, e, m in zip(bars, g["values"], err, marks):
                if v is not None:  # above the error bar and the published marker, never across them
                    ax.annotate(
                        f"{v:.1f}",
                        (b.get_x() + b.get_width() / 2, max(b.get_height() + e, m if m is not None else 0.0)),
                        xytext=(0, 3),
                        textcoords="offset points",
                        ha="center",
                        va="bottom",
                        fontsize=8,
                        rotation=90 if upright else 0,
                    )
            pub = g["published"]
            if pub:
                px = [x for x, p in zip(xs, pub) if p is not None]
                py = [p for p in pub if p is not None]
                if px:
                    ax.scatter(
                        px, py, marker="_", s=max(60, 400 * width), linewidths=2, color="black", zorder=5,
                        label=None if shown_pub else PUBLISHED_LEGEND,
                    )  # fmt: skip
                    shown_pub = True
        ax.set_xticks(range(3), ["Base", "New", "HM"])
        ax.set_ylabel("top-1 accuracy (%)")
        # published markers need the full scale; our numbers alone get room to be read
        head = 1.35 if upright else 1.2  # room above the tallest bar for its label
        ax.set_ylim(0, 115 if shown_pub else min(115.0, max(10.0, head * top)))
        ax.set_title(
            f"base-to-new: {dataset}" + (f"\n{title_suffix.strip()}" if title_suffix else ""), fontsize=9
        )
        ax.grid(axis="y", alpha=0.3)
        _outside_legend(ax)
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
        ax.grid(alpha=0.3)
        _outside_legend(ax)
        paths.append(_save(plt, fig, out_dir / f"fewshot_{_slug(dataset)}.png"))
    return paths


def smooth(values: Sequence[float], window: int | None = None) -> list[float]:
    """Exponential moving average with a span of ``window`` points (default: ~1/10 of the curve)."""
    vals = list(values)
    if not vals:
        return []
    span = window or max(1, len(vals) // 10)
    alpha = 2.0 / (span + 1.0)
    out, acc = [], vals[0]
    for v in vals:
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def training_curves(
    curves: Mapping[str, Mapping[str, Sequence[tuple[float, float | None, float | None]]]],
    out_dir: str | Path,
) -> list[Path]:
    """Training loss and accuracy against epochs, smoothed (the raw values faint behind) when a curve
    has enough points for a moving average to differ from them, else the points themselves.

    ``curves[figure_title][run_label] = [(epoch, loss, acc)]``, ``epoch`` fractional (1.5 = half-way
    through the second epoch).  A curve of one point is drawn as a marker.
    """
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for title, runs in curves.items():
        fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(9, 3.4))
        x_max = 0.0
        kind = None  # what the points are: per step or per epoch
        smoothed = False  # a smoothed line over a faint raw one was drawn (else the raw points only)
        for idx, (label, pts) in enumerate(runs.items()):
            color = f"C{idx % 10}"
            for ax, col in ((ax_l, 1), (ax_a, 2)):
                xy = [(p[0], p[col]) for p in pts if p[col] is not None]
                if not xy:
                    continue
                xs, ys = zip(*xy)
                x_max = max(x_max, max(xs))
                if len(xy) == 1:
                    ax.plot(xs, ys, marker="o", color=color, label=label)
                    continue
                per_step = any(abs(x - round(x)) > 1e-9 for x in xs) or len(set(xs)) < len(xs)
                kind = "per step" if per_step or kind == "per step" else "per epoch"
                few = len(xy) < 30  # a short run still shows its points
                if len(xy) // 10 > 1:  # enough points for the moving average to differ from them
                    ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8, marker="." if few else None)
                    ax.plot(
                        xs, smooth(ys), color=color, linewidth=1.6, label=label, marker="o" if few else None
                    )
                    smoothed = True
                else:
                    ax.plot(xs, ys, color=color, linewidth=1.2, label=label, marker="o")
        for ax, name in ((ax_l, "training loss"), (ax_a, "training accuracy (%)")):
            ax.set_xlabel("epoch")
            ax.set_ylabel(name)
            ax.set_xlim(0, max(1.0, math.ceil(x_max)))
            ax.grid(alpha=0.3)
        _outside_legend(ax_a)
        how = f" (smoothed; faint: {kind})" if smoothed else (f" ({kind})" if kind else "")
        fig.suptitle(title + how, fontsize=9)
        paths.append(_save(plt, fig, out_dir / f"train_{_slug(title)}.png"))
    return paths


def confusion_matrix(
    counts: Sequence[Sequence[int]],
    classnames: Sequence[str],
    title: str,
    path: str | Path,
    max_labels: int = 60,
) -> Path:
    """Row-normalised confusion matrix (true class down, predicted across); names up to ``max_labels``."""
    plt = _plt()

    m = np.asarray(counts, dtype=float)
    rows = m.sum(1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    c = len(classnames)
    side = min(12.0, max(4.5, 0.16 * c + 2.5))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if c <= max_labels:
        fs = max(4, min(8, int(300 / max(c, 1))))
        ax.set_xticks(range(c), list(classnames), rotation=90, fontsize=fs)
        ax.set_yticks(range(c), list(classnames), fontsize=fs)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(plt, fig, path)
