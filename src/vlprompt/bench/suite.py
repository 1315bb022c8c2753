"""`vlprompt bench suite`: what a whole protocol costs on this device, projected from measured costs.

A benchmark user waits for the suite (base-to-new: methods x 11 data sets x 3 seeds), not for one step.
This module plans the suite exactly as ``vlprompt run`` would (:func:`~vlprompt.protocols.grid.plan_grid`:
the presets' epochs and batch sizes, the registry's split sizes, the protocol's shots, subsamples and
evaluations) and multiplies it by costs **measured here, now**:

* a training step of each method at its official batch size and options, at two class counts
  (``step(C) = a + b*C`` through them; other class counts are interpolated or extrapolated);
* the evaluation cost per image of each method (a pass over a few random images at the evaluation
  batch, text features once, as in ``evaluate``);
* the decode + resize + crop cost per image (a real image of the data set when ``--root`` has it,
  otherwise a synthetic 500x375 JPEG) -- paid every epoch for training images and once per
  evaluation without the image cache, once per data set/split with it.

Everything else is extrapolated and the output says so: the number of steps and images from the
registry (a real data set can lose a few unreadable images), and no data-loader overlap (decoding is
counted serially: with ``--num-workers`` it partly hides behind compute).
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlprompt.backbones import load_backbone
from vlprompt.bench.benches import bench_eval, bench_train
from vlprompt.bench.config import BenchConfig
from vlprompt.bench.measure import _loadavg, device_info
from vlprompt.bench.results import label_reconstructed
from vlprompt.data import BENCHMARKS, build_transform, get_dataset, get_spec
from vlprompt.methods import bench_methods
from vlprompt.protocols.grid import GridRequest, plan_grid
from vlprompt.train.config import RunRequest
from vlprompt.train.precision import resolve_device
from vlprompt.utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class SuiteConfig:
    protocol: str = "base2new"
    # the trained methods of the suite: the registry's bench methods, in registration order
    methods: list[str] = field(default_factory=lambda: bench_methods())
    datasets: list[str] | None = None
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    shots: list[int] | None = None
    model: str = "ViT-B-16"
    device: str = "auto"
    classes: tuple[int, int] = (50, 500)  # the two class counts the step cost is measured at
    repeats: int = 2
    warmup: int = 1
    eval_images: int = 8
    eval_batch: int = 8
    root: str | None = None
    quick: bool = False

    @classmethod
    def quick_config(cls, **over: Any) -> SuiteConfig:
        """vlp-tiny, tiny class counts, one repeat: a smoke test (seconds)."""
        base: dict[str, Any] = dict(
            model="vlp-tiny", classes=(5, 20), repeats=1, warmup=1, eval_images=4, eval_batch=2, quick=True
        )
        base.update(over)
        return cls(**base)


# ----------------------------------------------------------------------------------------- plan
def _n_classes(spec: Any, subsample: str) -> int:
    total = spec.num_classes
    half = math.ceil(total / 2)
    return {"base": half, "new": total - half}.get(subsample, total)


def plan_suite(cfg: SuiteConfig) -> list[dict[str, Any]]:
    """One row per planned run: training classes, images, steps and evaluation images (registry sizes)."""

    datasets = cfg.datasets
    if datasets is None and cfg.protocol in ("base2new", "fewshot"):
        datasets = list(BENCHMARKS)  # the papers' 11 data sets
    run = RunRequest(cfg.methods[0], model=cfg.model) if cfg.methods else None
    specs = plan_grid(
        GridRequest(
            cfg.protocol, cfg.methods, datasets, cfg.seeds, "/nonexistent/suite-plan", cfg.shots, run=run
        )
    )
    rows = []
    for s in specs:
        dspec = get_spec(s.dataset)
        train, data = s.cfg.train, s.cfg.data
        sub = data.subsample
        c_train = _n_classes(dspec, sub)
        counts = dspec.counts or (0, 0, 0)
        n_train = int(s.shots) * c_train if s.shots else int(counts[0] * c_train / max(1, dspec.num_classes))
        batch = int(train.batch_size)
        steps_per_epoch = n_train // batch if n_train >= batch else 1  # drop_last, as the trainer
        evals = []
        for e in s.evaluations:
            t = get_spec(e.dataset)
            tc = (t.counts or (0, 0, 0))[2]
            c = _n_classes(t, e.subsample)
            evals.append(
                {
                    "dataset": e.dataset,
                    "subsample": e.subsample,
                    "classes": c,
                    "images": int(round(tc * c / max(1, t.num_classes))),
                }
            )
        rows.append(
            {
                "method": s.method,
                "dataset": s.dataset,
                "seed": s.seed,
                "shots": s.shots,
                "classes": c_train,
                "train_images": n_train,
                "batch": batch,
                "epochs": int(train.epochs),
                "steps": int(train.epochs) * steps_per_epoch,
                "eval_batch": int(train.eval_batch_size),
                "evaluations": evals,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------- measure
def measure_decode(
    root: str | None, dataset: str | None = None, size: int = 224, n: int = 8
) -> dict[str, Any]:
    """Seconds per image to decode + resize + centre-crop (a real image when available)."""

    source, paths = "synthetic 500x375 JPEG (quality 90)", []
    if root and dataset:
        try:
            paths = [d.impath for d in get_dataset(dataset, root).test[:n]]
            source = f"{len(paths)} test images of {dataset}"
        except Exception as e:  # no data here: fall back to a synthetic image, and say so
            log.info("decode cost from a synthetic image (%s)", str(e).splitlines()[0][:80])
    blobs = []
    if not paths:
        g = torch.Generator().manual_seed(0)
        arr = (torch.rand(375, 500, 3, generator=g) * 255).to(torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        blobs = [buf.getvalue()] * n
    tf = build_transform(False, size=size)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        with Image.open(paths[i % len(paths)] if paths else io.BytesIO(blobs[i])) as im:
            tf(im.convert("RGB"))
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"s_per_image": times[len(times) // 2], "source": source, "measured": n}


def measure_costs(cfg: SuiteConfig, backbone: Any, device: torch.device) -> dict[str, Any]:
    """Per method: training step seconds at ``cfg.classes`` and evaluation seconds per image."""

    bc = BenchConfig(
        model=cfg.model,
        repeats=cfg.repeats,
        warmup=cfg.warmup,
        eval_images=cfg.eval_images,
        eval_batch=cfg.eval_batch,
        profile=False,
        device=str(device),
    )
    out: dict[str, Any] = {}
    for m in cfg.methods:
        steps = {c: bench_train(backbone, m, c, "fast", bc, device) for c in cfg.classes}
        ev = bench_eval(backbone, m, cfg.classes[0], "fast", bc, device)
        out[m] = {
            "batch": next(iter(steps.values()))["batch"],
            "step_s": {str(c): r["ms_per_step"] / 1000 for c, r in steps.items()},
            "eval_s_per_image": ev["ms"] / 1000 / ev["images"],
            "eval_measured": {"images": ev["images"], "batch": ev["batch"], "classes": cfg.classes[0]},
        }
    return out


def step_seconds(cost: dict[str, Any], classes: int) -> float:
    """``a + b*C`` through the two measured class counts (b >= 0), never below the cheaper one's a."""
    pts = sorted((int(c), float(s)) for c, s in cost["step_s"].items())
    if len(pts) == 1:
        return pts[0][1]
    (c1, s1), (c2, s2) = pts[0], pts[-1]
    b = max(0.0, (s2 - s1) / (c2 - c1))
    return max(0.0, s1 + b * (classes - c1))


# ----------------------------------------------------------------------------------------- project
def project(plan: Sequence[dict[str, Any]], costs: dict[str, Any], decode_s: float) -> dict[str, Any]:
    """Seconds per run (compute, decoding without / with the image cache), totals per method/data set."""
    runs = []
    decoded: set[tuple] = set()  # with the cache: each training list / test split is decoded once
    for r in plan:
        c = costs[r["method"]]
        train_s = r["steps"] * step_seconds(c, r["classes"])
        eval_images = sum(e["images"] for e in r["evaluations"])
        eval_s = eval_images * c["eval_s_per_image"]
        used = r["steps"] * r["batch"]  # images through the decoder over all epochs
        dec_nocache = (used + eval_images) * decode_s
        dec_cache = 0.0
        tkey = ("train", r["dataset"], r["shots"], r["seed"], r["classes"])
        if tkey not in decoded:
            decoded.add(tkey)
            dec_cache += r["train_images"] * decode_s
        for e in r["evaluations"]:
            ekey = ("test", e["dataset"], e["subsample"])
            if ekey not in decoded:
                decoded.add(ekey)
                dec_cache += e["images"] * decode_s
        runs.append(
            {**r, "train_s": train_s, "eval_s": eval_s, "decode_s": dec_nocache, "decode_cached_s": dec_cache}
        )

    def totals(key: str) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for r in runs:
            t = out.setdefault(
                r[key], {"runs": 0, "train_h": 0.0, "eval_h": 0.0, "decode_h": 0.0, "decode_cached_h": 0.0}
            )
            t["runs"] += 1
            t["train_h"] += r["train_s"] / 3600
            t["eval_h"] += r["eval_s"] / 3600
            t["decode_h"] += r["decode_s"] / 3600
            t["decode_cached_h"] += r["decode_cached_s"] / 3600
        for t in out.values():
            t["total_h"] = t["train_h"] + t["eval_h"] + t["decode_h"]
            t["total_cached_h"] = t["train_h"] + t["eval_h"] + t["decode_cached_h"]
        return out

    by_method, by_dataset = totals("method"), totals("dataset")
    grand = {k: sum(t[k] for t in by_method.values()) for k in next(iter(by_method.values()))} if runs else {}
    return {"runs": runs, "by_method": by_method, "by_dataset": by_dataset, "total": grand}


def run_suite(cfg: SuiteConfig) -> dict[str, Any]:
    """Plan, measure and project; the result dict :func:`render_markdown` and :func:`write_suite` take."""

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    plan = plan_suite(cfg)
    backbone = load_backbone(cfg.model, device=device)
    load_start = _loadavg()
    costs = measure_costs(cfg, backbone, device)
    dec = None
    for name in dict.fromkeys(r["dataset"] for r in plan):  # the first data set present under --root
        dec = measure_decode(cfg.root, name, size=backbone.preprocess_cfg["size"])
        if not dec["source"].startswith("synthetic") or not cfg.root:
            break
    dec = dec or measure_decode(None, None, size=backbone.preprocess_cfg["size"])
    proj = project(plan, costs, dec["s_per_image"])
    methods = label_reconstructed([{"method": m} for m in cfg.methods])
    return {
        "kind": "suite-projection",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "device": device_info(device),
        "model": cfg.model,
        "costs": costs,
        "decode": dec,
        "projection": {k: v for k, v in proj.items() if k != "runs"},
        "n_runs": len(plan),
        "notes": sorted({r["note"] for r in methods if r.get("note")}),
        "reconstructed_methods": [r["method"] for r in methods if r.get("reconstructed")],
        "load_average": {"start": load_start, "end": _loadavg()},
        "wall_s": round(time.perf_counter() - t0, 1),
        "measured": [
            "training step per method at its official batch and options (fast paths), at "
            f"{cfg.classes[0]} and {cfg.classes[1]} classes (median of {cfg.repeats} after "
            f"{cfg.warmup} warm-up)",
            f"evaluation seconds per image per method ({cfg.eval_images} random images, batch "
            f"{cfg.eval_batch}, {cfg.classes[0]} classes, text features once)",
            f"decode + resize + crop per image ({dec['source']})",
        ],
        "extrapolated": [
            "step cost at other class counts: linear in the class count through the two measured points",
            "number of runs, steps and images: the grid `vlprompt run` would plan, with the registry's split "
            "sizes (shots x classes for training, test images split by class share for base/new)",
            "evaluation at the presets' batch (100) from the per-image cost at the measured batch",
            "decoding serial (no overlap with compute); with the image cache each training list and test "
            "split is decoded once for the whole suite",
        ],
    }


def _h(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def render_markdown(res: dict[str, Any]) -> str:
    d, cfg, p = res["device"], res["config"], res["projection"]
    lines = [
        f"# Suite projection: {cfg['protocol']} on {d.get('name', d.get('slug'))}",
        "",
        f"{len(cfg['methods'])} methods x {len(p['by_dataset'])} data sets x {len(cfg['seeds'])} seeds = "
        f"{res['n_runs']} runs, backbone {res['model']} (random weights: timing only), "
        f"measured in {res['wall_s']} s (load average {res['load_average']['start']} -> "
        f"{res['load_average']['end']}).",
        "",
    ]
    lines += [f"Note: {n}" for n in res.get("notes", [])] + ([""] if res.get("notes") else [])
    for title, key in (("per method", "by_method"), ("per data set", "by_dataset")):
        lines += [
            f"## Hours {title}",
            "",
            "| | runs | train h | eval h | decode h | total h | decode h (image cache) "
            "| total h (image cache) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, t in sorted(p[key].items(), key=lambda kv: -kv[1]["total_h"]):
            rec = key == "by_method" and name in res.get("reconstructed_methods", [])
            label = f"{name} (reconstructed)" if rec else name
            lines.append(
                f"| {label} | {t['runs']} | {_h(t['train_h'])} | {_h(t['eval_h'])} | {_h(t['decode_h'])} | "
                f"**{_h(t['total_h'])}** | {_h(t['decode_cached_h'])} | **{_h(t['total_cached_h'])}** |"
            )
        lines.append("")
    t = p.get("total") or {}
    if t:
        lines += [
            f"**Whole suite: {_h(t['total_h'])} h; with the image cache {_h(t['total_cached_h'])} h.**",
            "",
        ]
    lines += [
        "## Measured costs",
        "",
        "| method | batch | step s (per class count) | eval s / image |",
        "|---|---:|---|---:|",
    ]
    for m, c in res["costs"].items():
        steps = ", ".join(f"C={k}: {v:.3f}" for k, v in c["step_s"].items())
        lines.append(f"| {m} | {c['batch']} | {steps} | {c['eval_s_per_image']:.4f} |")
    lines += [
        "",
        f"Decode + resize + crop: {res['decode']['s_per_image'] * 1000:.1f} ms / image "
        f"({res['decode']['source']}).",
        "",
        "## What was measured",
        "",
    ]
    lines += [f"- {m}" for m in res["measured"]] + ["", "## What was extrapolated", ""]
    lines += [f"- {m}" for m in res["extrapolated"]] + [""]
    return "\n".join(lines)


def write_suite(res: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    stem = "suite-quick" if res["config"].get("quick") else f"suite-{res['config']['protocol']}"
    atomic_write_json(out / f"{stem}.json", res)
    atomic_write_text(out / f"{stem}.md", render_markdown(res))
    return out / f"{stem}.json", out / f"{stem}.md"
