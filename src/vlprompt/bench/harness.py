"""The benchmark harness behind ``vlprompt bench``: fast paths vs the reference computation.

What is timed (median of ``repeats`` runs after ``warmup`` runs, all in one process):

* a matmul peak of this machine (fp32 square GEMMs) -- the yardstick for achieved GFLOP/s;
* the frozen image tower forward (images/s, GFLOP/s, % of the matmul peak);
* the text tower forward vs context length (prompts/s);
* one training step per method and class count at the official batch size: forward, cross-entropy,
  backward into the prompt parameters only, SGD step;
* one evaluation pass over a fixed set of images per method.

Each is measured in up to three *variants*:

* ``reference`` -- what the reference implementations compute: every text sequence 77 tokens long,
  text features recomputed for every test batch, image features recomputed, explicit
  ``softmax(QK^T)V`` attention (``ModelOptions(truncate_text=False, cache_text=False, attention="plain")``);
* ``fast`` -- vlprompt's exact fast paths: truncation after the longest EOT, text features once per
  evaluation, fused SDPA attention (``is_causal`` in the text tower where the mask allows);
* ``fast+features`` -- additionally frozen image features from :mod:`vlprompt.train.features` (only
  for methods whose image side has no prompts; at training this needs augmentation off or
  pre-computed views -- the step then never touches the image tower).

Speed-ups are reference time / variant time from the same run.  Memory is the peak RSS (CPU, read
from ``/proc/self/status`` VmHWM, reset before each configuration through ``/proc/self/clear_refs``)
or ``torch.cuda.max_memory_allocated`` (GPU); on CPU we also report the increase over the RSS before
the configuration started (the activations and gradients of that configuration).

This module runs it all (:func:`run_bench`); the pieces live by concern: settings in
:mod:`~vlprompt.bench.config`, timing and memory in :mod:`~vlprompt.bench.measure`, the models and their
FLOPs in :mod:`~vlprompt.bench.models`, each measurement in :mod:`~vlprompt.bench.benches`, targets and
the report in :mod:`~vlprompt.bench.results`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from vlprompt.backbones import load_backbone
from vlprompt.bench.benches import (
    _train_variants,
    bench_eval,
    bench_image_tower,
    bench_text_tower,
    bench_train,
    pad_batch,
    profile_train_step,
)
from vlprompt.bench.config import BenchConfig
from vlprompt.bench.measure import MemoryProbe, _loadavg, device_info, matmul_peak
from vlprompt.bench.models import _cacheable, build_model, class_names, measured, reset_measured
from vlprompt.bench.results import (
    _method_cell,
    _speedups,
    _targets,
    default_out_dir,
    label_reconstructed,
    project_gpu_memory,
    render_markdown,
    write_results,
)
from vlprompt.errors import VlpromptError
from vlprompt.methods import list_methods
from vlprompt.train.precision import resolve_device

log = logging.getLogger(__name__)


def _available(methods: list[str]) -> tuple[list[str], list[str]]:
    known = set(list_methods())
    return [m for m in methods if m in known], [m for m in methods if m not in known]


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run every measurement of ``cfg`` and return the results dict (see :func:`write_results`)."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    try:
        return _run_bench(cfg)
    finally:
        torch.set_num_threads(threads)


def _run_bench(cfg: BenchConfig) -> dict[str, Any]:
    reset_measured()  # each bench reads the machine's table afresh
    if cfg.repeats < 1 or cfg.warmup < 0:
        raise VlpromptError(f"repeats={cfg.repeats}, warmup={cfg.warmup}: need repeats >= 1 and warmup >= 0")
    if any(c < 1 for c in cfg.classes):
        raise VlpromptError(f"class counts must be >= 1, got {cfg.classes}")
    device = resolve_device(cfg.device)
    methods, missing = _available(cfg.methods)
    eval_methods, missing_eval = _available(cfg.eval_methods)
    memory_methods, missing_mem = _available(cfg.memory_methods)
    skipped = sorted(set(missing + missing_eval + missing_mem))
    if skipped:
        log.warning("skipping methods not registered in this build: %s", ", ".join(skipped))
    torch.manual_seed(0)
    t_start = time.perf_counter()
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # open_clip logs model creation on the root logger
    try:
        backbone = load_backbone(cfg.model, None, device=device)
    finally:
        root.setLevel(level)
    peak = matmul_peak(device, n=512 if cfg.quick else 2048, repeats=3 if cfg.quick else 8)
    log.info("matmul peak: %.1f GFLOP/s", peak["peak_gflops"])
    res: dict[str, Any] = {
        "schema": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": device_info(device),
        "backbone": {
            "name": cfg.model,
            "weights": "random init (timing only; no accuracy meaning)",
            **backbone.describe(),
        },
        "config": dataclasses.asdict(cfg),
        "skipped_methods": skipped,
        "matmul": peak,
        "load_average_start": _loadavg(),
    }
    res["image_tower"] = bench_image_tower(backbone, cfg, device, peak["peak_gflops"])
    res["text_tower"] = bench_text_tower(backbone, cfg, device, peak["peak_gflops"])

    train_rows = []
    for c in cfg.classes:
        for m in methods:
            probe = build_model(m, backbone, min(c, 2), "fast")
            for variant in _train_variants(_cacheable(probe), cfg):
                train_rows.append(bench_train(backbone, m, c, variant, cfg, device))
    _speedups(train_rows, "ms_per_step", ("method", "classes"))
    res["train"] = train_rows

    eval_rows = []
    for c in cfg.classes:
        for m in eval_methods:
            probe = build_model(m, backbone, min(c, 2), "fast")
            variants = (["reference"] if cfg.reference else []) + ["fast"]
            if _cacheable(probe):
                variants.append("fast+features")
            for variant in variants:
                eval_rows.append(bench_eval(backbone, m, c, variant, cfg, device))
    _speedups(eval_rows, "ms", ("method", "classes"))
    res["eval"] = eval_rows

    mem_rows = []
    if cfg.memory_classes:
        for m in memory_methods:
            for ckpt in (False, True):
                row = bench_train(
                    backbone,
                    m,
                    cfg.memory_classes,
                    "fast",
                    dataclasses.replace(cfg, repeats=1, warmup=0),
                    device,
                    checkpoint_text=ckpt,
                )
                row["checkpoint_text"] = ckpt
                mem_rows.append(row)
    res["memory"] = mem_rows
    res["memory_projection"] = project_gpu_memory(backbone, mem_rows)

    # the peak again at the end: the machine's best observed GEMM rate is the yardstick
    end = matmul_peak(device, n=512 if cfg.quick else 2048, repeats=3 if cfg.quick else 8)
    res["matmul"] = {**peak, "start_gflops": peak["peak_gflops"], "end_gflops": end["peak_gflops"]}
    best = max(peak["peak_gflops"], end["peak_gflops"])
    res["matmul"]["peak_gflops"] = best
    for row in res["image_tower"] + res["text_tower"]:
        row["fraction_of_peak"] = round(row["gflops"] / best, 3) if best else None
    for rows in (res["train"], res["eval"], res["memory"]):
        label_reconstructed(rows)
    res["attention_choices"] = measured(device)[1].record()
    res["targets"] = _targets(res)
    res["profiles"] = {}
    if cfg.profile and device.type == "cpu":
        for t in res["targets"]:
            if t["met"] is False and "training" in t["target"]:
                method = t["target"].split()[0]
                variant = "fast+features" if "features" in t["target"] else "fast"
                log.info("profiling %s (%s): target missed", method, variant)
                res["profiles"][f"{method} {variant} C={t['classes']}"] = profile_train_step(
                    backbone, method, t["classes"], variant
                )
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    res["load_average_end"] = _loadavg()
    return res


__all__ = [
    "_method_cell",
    "_targets",
    "BenchConfig",
    "MemoryProbe",
    "bench_eval",
    "bench_train",
    "build_model",
    "class_names",
    "default_out_dir",
    "device_info",
    "label_reconstructed",
    "pad_batch",
    "render_markdown",
    "run_bench",
    "write_results",
]
