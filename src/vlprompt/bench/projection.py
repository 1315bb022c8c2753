"""What a planned grid will cost on this machine: ``vlprompt run --dry-run`` and the warning ``train``
prints before a long preset.

The grid's own runs (their presets' epochs and batch sizes, their real split sizes where the data
are present, the registry's otherwise) are multiplied by a short probe measured here, now, with the
``bench suite`` machinery: one training step per method at the runs' own batch size and at the
grid's smallest and largest class counts (``a + b*C`` between them), one evaluation pass (seconds
per image), the training augmentation per image and one image decode. Decoding is counted once per
training list and test split (the image cache). Not counted: process start, backbone load, model
construction, data-loader overlap, and the machine's load changing -- the measured ratio of a real
grid to its projection is in docs/scaling.md. On ``--executor slurm`` the projection is for *this*
machine's device, not the cluster's.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vlprompt.backbones import load_backbone
from vlprompt.bench.harness import BenchConfig, bench_eval, bench_train, device_info, resolve_device
from vlprompt.bench.suite import measure_decode, step_seconds
from vlprompt.data import build_transform, get_spec
from vlprompt.protocols.cost_report import duration
from vlprompt.protocols.grid import Evaluation, RunSpec
from vlprompt.run.train import build_splits

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    """The work of one run: what the projection multiplies."""

    name: str
    method: str
    dataset: str
    classes: int
    train_images: int
    batch: int
    epochs: int
    eval_images: int
    eval_batch: int = 100
    eval_splits: list[tuple[str, str, int]] = field(default_factory=list)  # (dataset, subsample, images)
    train_key: tuple = ()

    @property
    def steps(self) -> int:
        per_epoch = self.train_images // self.batch if self.train_images >= self.batch else 1
        return self.epochs * per_epoch


def _registry_counts(dataset: str, subsample: str) -> tuple[int, int, int]:
    """(classes, train images, test images) of a subsample from the registry's split sizes."""

    spec = get_spec(dataset)
    total = int(spec.num_classes or 0)
    half = math.ceil(total / 2)
    classes = {"base": half, "new": total - half}.get(subsample, total)
    counts = spec.counts or (0, 0, 0)
    share = classes / max(1, total)
    return classes, int(counts[0] * share), int(round(counts[2] * share))


def plan_runs(specs: Sequence[Any]) -> list[RunPlan]:
    """One :class:`RunPlan` per spec: real split sizes when the data set loads, else the registry's."""

    cache: dict[tuple, tuple[int, int, int]] = {}

    def sizes(cfg: Any, subsample: str, fewshot: bool) -> tuple[int, int, int]:
        d = cfg.data
        key = (d.dataset, str(d.root), subsample, d.shots if fewshot else 0, d.seed if fewshot else 0)
        if key not in cache:
            try:
                s = build_splits(cfg, subsample=subsample, fewshot_=fewshot)
                cache[key] = (len(s.classnames), len(s.train), len(s.test))
            except Exception as e:  # no data here: the registry's sizes (and shots x classes)
                log.debug("split sizes of %s from the registry (%s)", d.dataset, str(e).splitlines()[0][:80])
                c, n_train, n_test = _registry_counts(d.dataset, subsample)
                if fewshot and d.shots:
                    n_train = min(n_train, int(d.shots) * c) if n_train else int(d.shots) * c
                cache[key] = (c, n_train, n_test)
        return cache[key]

    plans = []
    for s in specs:
        cfg = s.cfg
        sub = cfg.data.subsample or "all"
        classes, n_train, _ = sizes(cfg, sub, True)
        evals = []
        for e in s.evaluations:
            ecfg = cfg.copy()
            ecfg.data.dataset = e.dataset
            ecfg.data.root = s.root or cfg.data.root
            _, _, n_test = sizes(ecfg, e.subsample, False)
            evals.append((e.dataset, e.subsample, n_test))
        plans.append(
            RunPlan(
                name=s.name, method=s.method, dataset=s.dataset, classes=classes, train_images=n_train,
                batch=int(cfg.train.batch_size), epochs=int(cfg.train.epochs),
                eval_images=sum(n for *_, n in evals), eval_splits=evals,
                eval_batch=int(cfg.train.eval_batch_size),
                train_key=(s.dataset, cfg.data.shots, cfg.data.seed, sub),
            )
        )  # fmt: skip
    return plans


def probe(plans: Sequence[RunPlan], model: str, device: str = "auto", root: str | None = None) -> dict:
    """Measure each method's step (two class counts), evaluation per image and the decode, here."""

    t0 = time.perf_counter()
    dev = resolve_device(device)
    backbone = load_backbone(model, device=dev)
    eval_batch = max(1, min(32, min((p.eval_batch for p in plans), default=32)))
    bc = BenchConfig(
        model=model,
        repeats=1,
        warmup=1,
        eval_images=eval_batch,
        eval_batch=eval_batch,
        profile=False,
        device=str(dev),
    )
    methods: dict[str, Any] = {}
    for m, b in dict.fromkeys((p.method, p.batch) for p in plans):
        cs = sorted({p.classes for p in plans if p.method == m and p.batch == b})
        points = sorted({max(2, cs[0]), max(2, cs[-1])})
        rows = {c: bench_train(backbone, m, c, "fast", bc, dev, batch=b) for c in points}
        ev = bench_eval(backbone, m, points[0], "fast", bc, dev)
        methods[f"{m}@{b}"] = {
            "batch": b,
            "step_s": {str(c): r["ms_per_step"] / 1000 for c, r in rows.items()},
            "eval_s_per_image": ev["ms"] / 1000 / ev["images"],
            "peak_mb": max([r["peak_mb"] for r in rows.values()] + [ev.get("peak_mb") or 0.0]),
        }
    first = plans[0].dataset if plans else None
    dec = measure_decode(root, first, size=backbone.preprocess_cfg["size"])
    return {
        "augment_s": measure_augment(backbone.preprocess_cfg),
        "device": device_info(dev),
        "model": model,
        "methods": methods,
        "decode_s": dec["s_per_image"],
        "decode_source": dec["source"],
        "probe_s": round(time.perf_counter() - t0, 1),
    }


def measure_augment(preprocess_cfg: dict[str, Any], n: int = 8) -> float:
    """Seconds per image of the training transform (random crop, flip, to tensor, normalise) on a
    decoded 500x375 image: paid every epoch for every training image, besides the step itself."""

    g = torch.Generator().manual_seed(0)
    im = Image.fromarray((torch.rand(375, 500, 3, generator=g) * 255).to(torch.uint8).numpy())
    tf = build_transform(True, **preprocess_cfg)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        tf(im)
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2]


def project(plans: Sequence[RunPlan], measured: dict[str, Any]) -> dict[str, Any]:
    """Seconds per method (train, eval, decode) and for the grid, and the peak memory to expect."""

    per: dict[str, dict[str, float]] = {}
    decoded: set[tuple] = set()
    for p in plans:
        c = measured["methods"][f"{p.method}@{p.batch}"]
        train_s = p.steps * step_seconds(c, p.classes)  # measured at the run's own batch
        train_s += p.steps * p.batch * measured.get("augment_s", 0.0)
        eval_s = p.eval_images * c["eval_s_per_image"]
        dec = 0.0
        if p.train_key not in decoded:
            decoded.add(p.train_key)
            dec += p.train_images * measured["decode_s"]
        for ds, sub, n in p.eval_splits:
            if ("test", ds, sub) not in decoded:
                decoded.add(("test", ds, sub))
                dec += n * measured["decode_s"]
        t = per.setdefault(p.method, {"runs": 0, "train_s": 0.0, "eval_s": 0.0, "decode_s": 0.0, "steps": 0})
        t["runs"] += 1
        t["steps"] += p.steps
        t["train_s"] += train_s
        t["eval_s"] += eval_s
        t["decode_s"] += dec
    for m, t in per.items():
        t["total_s"] = t["train_s"] + t["eval_s"] + t["decode_s"]
        t["peak_mb"] = max(v["peak_mb"] for k, v in measured["methods"].items() if k.split("@")[0] == m)
    total = {
        k: sum(t[k] for t in per.values())
        for k in ("runs", "steps", "train_s", "eval_s", "decode_s", "total_s")
    }
    total["peak_mb"] = max((t["peak_mb"] for t in per.values()), default=0.0)
    return {"by_method": per, "total": total}


def render(proj: dict[str, Any], measured: dict[str, Any], jobs: int = 1) -> str:

    d = measured["device"]
    kind = "GPU max allocated" if d.get("type") == "cuda" else "peak RSS"
    lines = [
        f"projected cost on this machine ({d.get('name', d.get('slug'))}, {measured['model']}; probe "
        f"{measured['probe_s']} s):",
        f"  {'method':10} {'runs':>5} {'steps':>8} {'train':>10} {'eval':>10} {'decode':>10} {'total':>10}"
        f" {'peak MB':>8}",
    ]
    rows = sorted(proj["by_method"].items()) + [("all", proj["total"])]
    for m, t in rows:
        lines.append(
            f"  {m:10} {t['runs']:>5} {t['steps']:>8} {duration(t['train_s']):>10}"
            f" {duration(t['eval_s']):>10} {duration(t['decode_s']):>10} {duration(t['total_s']):>10}"
            f" {t['peak_mb']:>8.0f}"
        )
    tot = proj["total"]["total_s"]
    par = f"; with {jobs} parallel jobs about {duration(tot / jobs)} of wall time" if jobs > 1 else ""
    lines.append(
        f"  = {duration(tot)} of compute for the runs still to do{par}; peak memory per run about "
        f"{proj['total']['peak_mb']:.0f} MB ({kind}). Not counted: process start, backbone load and "
        "per-run setup (see docs/scaling.md for the measured ratio)."
    )
    return "\n".join(lines)


def project_specs(specs: Sequence[Any], device: str = "auto", jobs: int = 1) -> str | None:
    """The rendered projection of ``specs`` (one probe per backbone), or ``None`` when nothing is to do."""
    plans_by_model: dict[str, list[RunPlan]] = {}
    roots: dict[str, str | None] = {}
    for s, p in zip(specs, plan_runs(specs), strict=True):
        model = s.cfg.backbone.name
        plans_by_model.setdefault(model, []).append(p)
        roots.setdefault(model, s.root or s.cfg.data.root)
    out = []
    for model, plans in plans_by_model.items():
        measured = probe(plans, model, device=device, root=roots[model])
        out.append(render(project(plans, measured), measured, jobs))
    return "\n".join(out) if out else None


@dataclass
class Estimate:
    seconds: float
    text: str


#: ``vlprompt train`` probes and prints its projection when training sees at least this many images
LONG_RUN_IMAGES = 50_000


def announce(cfg: Any, print_fn: Any = print) -> Estimate | None:
    """Before a long preset (>= LONG_RUN_IMAGES images through training) print what it will cost here.
    ``VLPROMPT_NO_PROJECTION=1`` skips the probe."""

    if os.environ.get("VLPROMPT_NO_PROJECTION") == "1":
        return None
    sub = cfg.data.subsample or "all"
    spec = RunSpec(cfg.protocol or "single", cfg.method, cfg.data.dataset, cfg.data.shots or 0,
                   cfg.data.seed, None, cfg, [Evaluation(cfg.data.dataset, sub)], cfg.data.root)  # fmt: skip
    try:
        plan = plan_runs([spec])[0]
        build_splits(cfg)  # a request the run layer refuses (too many shots ...): no probe before it says so
    except Exception:  # a data set that does not load: train_run reports it in its own words
        return None
    if plan.steps * plan.batch < LONG_RUN_IMAGES:
        return None
    print_fn(
        f"{cfg.method}: {plan.epochs} epochs x {plan.train_images} images ({plan.steps} steps); "
        "measuring a few steps here to project the time (VLPROMPT_NO_PROJECTION=1 skips this) ..."
    )
    try:
        measured = probe([plan], cfg.backbone.name, device=cfg.train.device, root=cfg.data.root)
    except Exception as e:  # never stop a training because its forecast failed
        print_fn(f"no cost projection: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
        return None
    proj = project([plan], measured)
    est = Estimate(proj["total"]["total_s"], render(proj, measured))
    print_fn(est.text)
    return est
