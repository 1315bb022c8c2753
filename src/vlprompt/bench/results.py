"""Bench results: speed-ups, the targets met or missed, the markdown report and the files written."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from vlprompt.bench.config import TARGETS
from vlprompt.methods import get_method
from vlprompt.utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def _speedups(rows: list[dict[str, Any]], key: str, keys: tuple[str, ...]) -> None:
    """Add ``speedup`` = reference time / variant time to every non-reference row."""
    ref = {tuple(r[k] for k in keys): r[key] for r in rows if r["variant"] == "reference"}
    for r in rows:
        base = ref.get(tuple(r[k] for k in keys))
        r["speedup"] = round(base / r[key], 2) if base and r["variant"] != "reference" else None


def _targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's performance targets, measured (or why they could not be)."""
    out = []

    def train_speedup(method: str, variant: str) -> tuple[float | None, int | None]:
        rows = [
            r for r in res["train"] if r["method"] == method and r["variant"] == variant and r.get("speedup")
        ]
        if not rows:
            return None, None
        r = min(rows, key=lambda r: abs(r["classes"] - 100))
        return r["speedup"], r["classes"]

    for method, variant, name in [
        ("mpl", "fast", "mpl_train"),
        ("maple", "fast", "maple_train"),
        ("coop", "fast+features", "coop_train_features"),
    ]:
        s, c = train_speedup(method, variant)
        out.append(
            {
                "target": f"{method} training step ({variant}) >= {TARGETS[name]}x vs reference",
                "classes": c,
                "measured": s,
                "met": None if s is None else s >= TARGETS[name],
            }
        )
    for r in res["eval"]:
        if r["variant"] == "fast" and r.get("speedup"):
            out.append(
                {
                    "target": f"evaluation {r['method']} (fast) >= {TARGETS['eval']}x vs reference",
                    "classes": r["classes"],
                    "measured": r["speedup"],
                    "met": r["speedup"] >= TARGETS["eval"],
                }
            )
    default = [r for r in res["image_tower"] if r["attention"] in ("auto", "sdpa")]  # sdpa: older results
    if default and default[0].get("fraction_of_peak") is not None:
        f = default[0]["fraction_of_peak"]
        out.append(
            {
                "target": f"image-tower forward >= {int(TARGETS['image_peak'] * 100)}% of the matmul peak",
                "classes": None,
                "measured": f,
                "met": f >= TARGETS["image_peak"],
            }
        )
    return out


def label_reconstructed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark rows of a method reconstructed from its paper (DPL) with ``reconstructed`` + the note."""

    for r in rows:
        note = get_method(r["method"]).reconstruction_note if r.get("method") else ""
        if note:
            r["reconstructed"], r["note"] = True, note
    return rows


def _method_cell(r: dict[str, Any]) -> str:
    return f"{r['method']} (reconstructed)" if r.get("reconstructed") else str(r["method"])


def project_gpu_memory(backbone: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """GPU memory of each memory row: measured when the bench ran on CUDA, else projected from the CPU
    measurement (stated as an estimate, not a GPU measurement).

    On a GPU the same step holds the fp32 weights (exact, from the parameter count) plus the
    activations and gradients measured here as the RSS increase of the step; with bf16 autocast the
    activations are about half.  CUDA context and allocator slack (~0.5-1 GB) come on top, measured or not.
    """
    weights_mb = sum(p.numel() * p.element_size() for p in backbone.parameters()) / 2**20
    out = []
    for r in rows:
        row = {"method": r["method"], "classes": r["classes"], "checkpoint_text": r.get("checkpoint_text")}
        if r.get("memory_kind") == "cuda_max_allocated":  # torch.cuda.max_memory_allocated: no projection
            gb = r["peak_mb"] / 1024
            out.append({**row, "measured_gpu_gb_fp32": round(gb, 2), "fits_16gb_fp32": gb + 1.0 <= 16})
            continue
        act = r["delta_mb"]
        out.append(
            {
                **row,
                "weights_mb": round(weights_mb, 1),
                "activations_mb_fp32": act,
                "projected_gpu_gb_fp32": round((weights_mb + act) / 1024 + 1.0, 2),
                "projected_gpu_gb_bf16": round((weights_mb + act / 2) / 1024 + 1.0, 2),
                "fits_16gb_fp32": (weights_mb + act) / 1024 + 1.0 <= 16,
            }
        )
    return out


def _memory_table(rows: list[dict[str, Any]], gpu: list[dict[str, Any]]) -> list[str]:
    """The memory rows: measured on CUDA (``cuda_max_allocated``) or CPU peak RSS with a GPU projection."""
    cuda = all(r.get("memory_kind") == "cuda_max_allocated" for r in rows)
    if cuda:
        cols, align = "CUDA max allocated MB | Δ MB (activations+grads) | fits 16 GB", "---:|---:|---"
        note = (
            "Measured on the GPU in fp32: `torch.cuda.max_memory_allocated` during the step (weights "
            "included; Δ is the increase over what was allocated before it). The CUDA context and the "
            'allocator\'s cache (about 0.5-1 GB) come on top; "fits 16 GB" counts 1 GB for them.'
        )
    else:
        cols = "peak RSS MB | Δ MB (activations+grads) | projected GPU GB fp32 | bf16 | fits 16 GB"
        align = "---:|---:|---:|---:|---"
        note = (
            "GPU figures are projections from the CPU measurement (fp32 weights + the measured "
            "activation/gradient increase, halved for bf16, + 1 GB CUDA context), not GPU measurements."
        )
    lines = [f"| method | classes | checkpoint_text | ms/step | {cols} |", f"|---|---:|---|---:|{align}|"]
    for r, p in zip(rows, gpu, strict=True):
        projected = "" if cuda else (
            f"{_fmt(p['projected_gpu_gb_fp32'], 2)} | {_fmt(p['projected_gpu_gb_bf16'], 2)} | "
        )  # fmt: skip
        lines.append(
            f"| {_method_cell(r)} | {r['classes']} | {_fmt(r['checkpoint_text'])} | "
            f"{_fmt(r['ms_per_step'])} | {_fmt(r['peak_mb'], 0)} | {_fmt(r['delta_mb'], 0)} | "
            f"{projected}{_fmt(p['fits_16gb_fp32'])} |"
        )
    return [*lines, "", note]


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if not math.isinf(v) else "inf"
    return str(v)


def render_markdown(res: dict[str, Any]) -> str:
    """The results as Markdown tables (what benchmarks/README.md and the project README quote)."""
    d = res["device"]
    cfg = res["config"]
    lines = [
        f"# vlprompt bench — {res['backbone']['name']} on {d['name']}"
        + (f" ({d.get('cores')} cores, {d.get('threads')} threads)" if d["type"] == "cpu" else ""),
        "",
        f"Created {res['created']}, torch {d['torch']}, {res['backbone']['weights']}. "
        f"Median of {cfg['repeats']} runs after {cfg['warmup']} warm-up; whole run {res['wall_s']} s; "
        f"load average (1/5/15 min) at start {res.get('load_average_start')}, "
        f"at end {res.get('load_average_end')}.",
        f"Matmul peak (fp32 {res['matmul']['n']}² GEMM, best of the runs at start and end): "
        f"**{res['matmul']['peak_gflops']} GFLOP/s** (start {res['matmul'].get('start_gflops')}, "
        f"end {res['matmul'].get('end_gflops')}).",
        "",
    ]
    if res.get("skipped_methods"):
        lines += [
            f"Not benchmarked (method not registered in this build): {', '.join(res['skipped_methods'])}.",
            "",
        ]
    notes = sorted({r["note"] for k in ("train", "eval", "memory") for r in res.get(k, []) if r.get("note")})
    lines += [f"Note: {n}" for n in notes] + ([""] if notes else [])
    lines += ["## Training step (official batch size)", ""]
    lines += [
        "| method | classes | variant | batch | text tokens (shared) | ms/step | images/s | GFLOP/s "
        "| peak MB | Δ MB | speed-up |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["train"]:
        lines.append(
            f"| {_method_cell(r)} | {r['classes']} | {r['variant']} | {r['batch']} | "
            f"{r['text_tokens']} ({r.get('shared_prefix') or 0}) | "
            f"{_fmt(r['ms_per_step'])} | {_fmt(r['images_per_s'], 2)} | {_fmt(r['gflops'])} | "
            f"{_fmt(r['peak_mb'], 0)} | {_fmt(r['delta_mb'], 0)} | "
            f"{_fmt(r['speedup'], 2) + '×' if r.get('speedup') else '–'} |"
        )
    lines += ["", "## Evaluation", ""]
    lines += [
        "| method | classes | variant | images | batch | text passes | ms | images/s | GFLOP/s | speed-up |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["eval"]:
        lines.append(
            f"| {_method_cell(r)} | {r['classes']} | {r['variant']} | {r['images']} | {r['batch']} | "
            f"{r['text_passes']} | "
            f"{_fmt(r['ms'])} | {_fmt(r['images_per_s'], 2)} | {_fmt(r['gflops'])} | "
            f"{_fmt(r['speedup'], 2) + '×' if r.get('speedup') else '–'} |"
        )
    lines += ["", "## Image tower forward (frozen, no prompts)", ""]
    lines += [
        "| attention | batch | ms | images/s | GFLOP/s | % of matmul peak |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["image_tower"]:
        frac = r.get("fraction_of_peak")
        lines.append(
            f"| {r['attention']} | {r['batch']} | {_fmt(r['ms'])} | {_fmt(r['images_per_s'], 2)} | "
            f"{_fmt(r['gflops'])} | {_fmt(None if frac is None else 100 * frac)} |"
        )
    lines += ["", "## Text tower forward vs context length (no prompts)", ""]
    lines += ["| tokens | attention | prompts | ms | prompts/s | GFLOP/s |", "|---:|---|---:|---:|---:|---:|"]
    for r in res["text_tower"]:
        lines.append(
            f"| {r['length']} | {r['attention']} | {r['prompts']} | {_fmt(r['ms'])} | "
            f"{_fmt(r['prompts_per_s'])} | {_fmt(r['gflops'])} |"
        )
    if res.get("memory"):
        lines += ["", "## Memory at many classes (one fast training step)", ""]
        lines += _memory_table(res["memory"], res["memory_projection"])
    lines += ["", "## Targets", "", "| target | classes | measured | met |", "|---|---:|---:|---|"]
    for t in res["targets"]:
        lines.append(
            f"| {t['target']} | {_fmt(t['classes'])} | {_fmt(t['measured'], 2)} | {_fmt(t['met'])} |"
        )
    for name, ops in (res.get("profiles") or {}).items():
        lines += ["", f"### Profile: {name} (one step, top operators by self CPU time)", ""]
        lines += ["| operator | self ms | share |", "|---|---:|---:|"]
        for o in ops:
            lines.append(f"| `{o['op']}` | {_fmt(o['self_ms'])} | {_fmt(100 * o['share'])}% |")
    return "\n".join(lines) + "\n"


def default_out_dir(res: dict[str, Any], root: str | Path = "benchmarks/results") -> Path:
    return Path(root) / res["device"]["slug"]


def write_results(res: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` (quick runs: ``quick.json`` / ``quick.md``) atomically."""
    out_dir = Path(out_dir)
    stem = "quick" if res["config"].get("quick") else "results"
    jpath, mpath = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic_write_json(jpath, json.loads(json.dumps(res, default=str)))
    atomic_write_text(mpath, render_markdown(res))
    return jpath, mpath
