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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlprompt.bench.flops import (
    TowerFlops,
    image_tower_flops,
    matmul_flops,
    text_tower_flops,
    text_tower_flops_shared_prefix,
)
from vlprompt.errors import VlpromptError
from vlprompt.train.features import frozen_image_features
from vlprompt.utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

VARIANT_OPTIONS: dict[str, dict[str, Any]] = {
    "reference": {"truncate_text": False, "cache_text": False, "attention": "plain", "share_prefix": False},
    "fast": {"truncate_text": True, "cache_text": True, "attention": "auto", "share_prefix": True},
    "fast+features": {"truncate_text": True, "cache_text": True, "attention": "auto", "share_prefix": True},
}
TARGETS = {"mpl_train": 2.0, "maple_train": 2.0, "coop_train_features": 10.0, "eval": 1.3, "image_peak": 0.75}


# ----------------------------------------------------------------------------------------- config
@dataclass
class BenchConfig:
    """What ``vlprompt bench`` measures; the defaults fit ``make bench`` (< 15 min on 2 CPU cores)."""

    model: str = "ViT-B-16"
    methods: list[str] = field(default_factory=lambda: ["coop", "maple", "mpl"])
    classes: list[int] = field(default_factory=lambda: [100])
    repeats: int = 2
    warmup: int = 1
    reference: bool = True  # also time the reference computation (speed-ups need it)
    variants_fast_plain: bool = False  # also time "fast" (no feature cache) for cacheable methods
    eval_methods: list[str] = field(default_factory=lambda: ["zeroshot", "mpl"])
    eval_images: int = 16
    eval_batch: int = 8
    eval_warmup: int = 0  # kernels are warm from the training steps; an evaluation is long
    text_prompts: int = 32
    text_lengths: list[int] = field(default_factory=lambda: [8, 16, 32, 77])
    image_batch: int = 8
    memory_methods: list[str] = field(default_factory=lambda: ["mpl"])
    memory_classes: int = 1000
    profile: bool = True  # profile configurations that miss a target
    device: str = "auto"
    compile: bool = False
    threads: int | None = None
    out: str | None = None
    quick: bool = False

    @classmethod
    def quick_config(cls, **over: Any) -> BenchConfig:
        """Tiny settings (vlp-tiny, 10 classes, 1 repeat): a smoke test that finishes in seconds."""
        base = dict(
            model="vlp-tiny",
            methods=["coop", "mpl"],
            classes=[10],
            repeats=1,
            warmup=1,
            eval_methods=["zeroshot", "mpl"],
            eval_images=4,
            eval_batch=2,
            eval_warmup=1,
            text_prompts=8,
            text_lengths=[8, 77],
            image_batch=2,
            memory_methods=["mpl"],
            memory_classes=20,
            profile=False,
            quick=True,
        )
        base.update(over)
        return cls(**base)


# ----------------------------------------------------------------------------------------- device
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VlpromptError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    return dev


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_info(device: torch.device) -> dict[str, Any]:
    """Machine description for the results (and the results folder's slug)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        slug = f"cuda-{_slug(name)}"
        return {"type": "cuda", "name": name, "slug": slug, "torch": torch.__version__}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    name = cpu_model_name()
    return {
        "type": "cpu",
        "name": name,
        "cores": cores,
        "threads": torch.get_num_threads(),
        "slug": f"cpu-{_slug(name)}-{cores}cores",
        "torch": torch.__version__,
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
    }


# ----------------------------------------------------------------------------------------- memory
def _status_kb(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``) so the next peak starts clean."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the RSS baseline then includes retained memory
        pass


class MemoryProbe:
    """Peak memory of one configuration: CPU peak RSS (reset first) or CUDA max allocated."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> MemoryProbe:
        _release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.reset = True
        else:
            self.reset = reset_peak_rss()
            self.base = (_status_kb("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = (_status_kb("VmHWM") or 0) * 1024

    def result(self) -> dict[str, Any]:
        mb = 1 / 2**20
        kind = "cuda_max_allocated" if self.device.type == "cuda" else "peak_rss"
        return {
            "memory_kind": kind,
            "peak_mb": round(self.peak * mb, 1),
            "delta_mb": round((self.peak - self.base) * mb, 1),
            "peak_reset": self.reset,  # False: peak is process-wide since start (monotone)
        }


# ----------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls (first call time kept)."""
    times: list[float] = []
    first = None
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        if i == 0:
            first = dt
        if i >= warmup:
            times.append(dt)
    return {"median_s": statistics.median(times), "times_s": [round(t, 4) for t in times], "first_s": first}


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """fp32 GEMM throughput (n x n @ n x n) on ``device``: the best and median of ``repeats``."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    flops = matmul_flops(n, n, n)
    r = time_it(lambda: a @ b, repeats, 3, device)
    best = min(r["times_s"]) if r["times_s"] else r["median_s"]
    return {
        "n": n,
        "peak_gflops": round(flops / max(best, 1e-12) / 1e9, 1),
        "median_gflops": round(flops / r["median_s"] / 1e9, 1),
    }


# ----------------------------------------------------------------------------------------- models
def class_names(n: int) -> list[str]:
    """``n`` unique, realistic class names (ImageNet's as CLIP writes them; numbered beyond 1000).

    Real names matter: their token lengths set where the text tower can be truncated.
    """
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names: list[str] = []
    seen: set[str] = set()
    for name in IMAGENET_CLASSNAMES[:n]:
        if name in seen:  # ImageNet has two "crane"s and two "maillot"s
            name = f"{name} (2)"
        seen.add(name)
        names.append(name)
    names += [f"object {i}" for i in range(len(names), n)]
    return names


def method_recipe(method: str) -> tuple[dict[str, Any], int]:
    """(official options, official batch size): the preset's, else the registry entry's bench batch size."""
    from vlprompt.methods import get_method
    from vlprompt.train.config import load_preset

    cls = get_method(method)
    preset = load_preset(method)
    batch = (cls.preset().get("train") or {}).get("batch_size") or cls.bench_batch_size or 4
    return dict(preset.get("options") or {}), int(batch)


def build_model(method: str, backbone: Any, n_classes: int, variant: str, **extra: Any):
    """A PromptModel of ``method`` with its official options and the variant's execution options."""
    from vlprompt.methods.model import ModelOptions, create_model

    opts, _ = method_recipe(method)
    max_depth = min(backbone.text.layers, backbone.image.layers)
    for k, v in list(opts.items()):  # official depths on a smaller test backbone (--quick): clamp
        if "depth" in k and isinstance(v, int) and not isinstance(v, bool) and v > max_depth:
            log.debug("%s: %s=%d clamped to the backbone's %d layers", method, k, v, max_depth)
            opts[k] = max_depth
    execution = ModelOptions(**{**VARIANT_OPTIONS[variant], **extra})
    return create_model(method, backbone, class_names(n_classes), model=execution, **opts)


def _cacheable(model: Any) -> bool:
    return not model.method.prompts_image


def _text_length(model: Any, inputs: Any) -> int:
    """Instance tokens the text tower runs (truncated as :func:`engine.encode_text` does, or full)."""
    if not model.options.truncate_text:
        return int(inputs.embeds.shape[1])
    length = int(inputs.eot.max()) + 1
    if inputs.plan is not None:
        for op in inputs.plan.layers.values():
            if op.replace is not None:
                length = max(length, op.replace_at + op.replace.shape[-2])
    return length


def shared_prefix(model: Any, inputs: Any) -> int:
    """Leading text tokens computed once for all class prompts under the model's options (0 = none)."""
    from vlprompt.engine import shared_prefix_length

    opts = model.options
    if not opts.share_prefix or opts.checkpoint_text or opts.attention not in ("sdpa", "auto"):
        return 0
    length = _text_length(model, inputs)
    pos = model.backbone.clip.positional_embedding[:length]
    if inputs.embeds.shape[0] > max(1, int(opts.text_chunk)):
        return 0  # chunks share their own prefixes; counted without sharing (conservative)
    with torch.no_grad():
        p = shared_prefix_length(inputs.embeds[:, :length] + pos, inputs.plan)
    return p if p >= 2 else 0


def step_flops(
    model: Any, batch: int, train: bool, image_side: bool, text_calls: int = 1
) -> dict[str, float]:
    """FLOPs of one training step / one evaluation batch of ``model`` (see :mod:`vlprompt.bench.flops`)."""
    backbone = model.backbone
    img = TowerFlops(0.0, 0.0)
    if image_side:
        img = image_tower_flops(backbone.clip.visual, batch, model.method.image_plan())
        if not (train and model.method.prompts_image):
            img = TowerFlops(img.forward, 0.0)
    with torch.no_grad():
        feats = None
        if model.method.image_conditioned_text:
            feats = F.normalize(torch.randn(batch, backbone.embed_dim, device=backbone.device), dim=-1)
        inputs = model.method.text_inputs(feats)
    n_seq, length = int(inputs.embeds.shape[0]), _text_length(model, inputs)
    prefix = shared_prefix(model, inputs)
    if prefix:
        txt = text_tower_flops_shared_prefix(backbone.clip, n_seq, length, prefix)
    else:
        txt = text_tower_flops(backbone.clip, n_seq, length, inputs.plan)
    if not train:
        txt = TowerFlops(txt.forward, 0.0)
    total = img.train + text_calls * txt.train
    return {"image_gflop": img.train / 1e9, "text_gflop": text_calls * txt.train / 1e9, "gflop": total / 1e9}


def frozen_grads_allocated(model: Any) -> int:
    """Number of frozen CLIP tensors holding a ``.grad`` (must stay 0)."""
    return sum(p.grad is not None for p in model.backbone.parameters())


def _maybe_compile(fn: Callable, enabled: bool) -> Callable:
    if not enabled:
        return fn
    return torch.compile(fn, dynamic=False)


def pad_batch(x: torch.Tensor, size: int) -> tuple[torch.Tensor, int]:
    """Pad a short last batch to ``size`` (zeros) so a compiled model sees one shape, never recompiles."""
    n = x.shape[0]
    if n >= size:
        return x, n
    pad = x.new_zeros((size - n, *x.shape[1:]))
    return torch.cat([x, pad]), n


# ----------------------------------------------------------------------------------------- benches
def bench_image_tower(
    backbone: Any, cfg: BenchConfig, device: torch.device, peak: float
) -> list[dict[str, Any]]:
    """Frozen image-tower forward at ``cfg.image_batch``: the default (auto) attention, and with
    ``--reference`` each fixed implementation (SDPA, the plain reference) for comparison."""
    images = torch.randn(cfg.image_batch, 3, *_image_size(backbone), device=device)
    flops = image_tower_flops(backbone.clip.visual, cfg.image_batch).forward
    rows = []
    for attention in ["auto", "sdpa", "plain"] if cfg.reference else ["auto"]:
        fn = _maybe_compile(lambda a=attention: frozen_image_features(backbone, images, a), cfg.compile)
        with torch.inference_mode(), MemoryProbe(device) as mem:
            r = time_it(fn, cfg.repeats, cfg.warmup, device)
        gflops = flops / r["median_s"] / 1e9
        rows.append(
            {
                "attention": attention,
                "batch": cfg.image_batch,
                "ms": round(1000 * r["median_s"], 1),
                "images_per_s": round(cfg.image_batch / r["median_s"], 2),
                "gflop": round(flops / 1e9, 2),
                "gflops": round(gflops, 1),
                "fraction_of_peak": round(gflops / peak, 3) if peak else None,
                "times_s": r["times_s"],
                **mem.result(),
            }
        )
        log.info("image tower %s: %.1f images/s, %.1f GFLOP/s", attention, rows[-1]["images_per_s"], gflops)
    return rows


def _image_size(backbone: Any) -> tuple[int, int]:
    size = backbone.preprocess_cfg["size"]
    return (size, size)


def bench_text_tower(
    backbone: Any, cfg: BenchConfig, device: torch.device, peak: float
) -> list[dict[str, Any]]:
    """Text-tower forward (no prompts) for ``cfg.text_prompts`` sequences at each context length."""
    from vlprompt.engine import ATTENTION_MODES, encode_text

    rows = []
    ctx_len = backbone.context_length
    n = cfg.text_prompts
    for length in sorted({min(L, ctx_len) for L in cfg.text_lengths}):
        embeds = backbone.token_embed(torch.randint(1, 1000, (n, ctx_len)))
        eot = torch.full((n,), length - 1, dtype=torch.long)
        attns = ["auto", "sdpa", "plain"] if (cfg.reference and length == ctx_len) else ["auto"]
        for attention in attns:
            # truncation is what makes the tower run `length` tokens; the reference runs all 77
            def fn(a=attention, embeds=embeds, eot=eot):
                return encode_text(
                    backbone.clip, embeds, eot, None, truncate=True, default_attention=ATTENTION_MODES[a]
                )

            with torch.inference_mode():
                r = time_it(fn, cfg.repeats, cfg.warmup, device)
            flops = text_tower_flops(backbone.clip, n, length).forward
            rows.append(
                {
                    "length": length,
                    "attention": attention,
                    "prompts": n,
                    "ms": round(1000 * r["median_s"], 1),
                    "prompts_per_s": round(n / r["median_s"], 1),
                    "gflops": round(flops / r["median_s"] / 1e9, 1),
                    "fraction_of_peak": round(flops / r["median_s"] / 1e9 / peak, 3) if peak else None,
                }
            )
            log.info("text tower L=%d %s: %.0f prompts/s", length, attention, rows[-1]["prompts_per_s"])
    return rows


def _train_variants(model_cacheable: bool, cfg: BenchConfig) -> list[str]:
    out = ["reference"] if cfg.reference else []
    if model_cacheable:
        out += (["fast"] if cfg.variants_fast_plain else []) + ["fast+features"]
    else:
        out += ["fast"]
    return out


def bench_train(
    backbone: Any,
    method: str,
    n_classes: int,
    variant: str,
    cfg: BenchConfig,
    device: torch.device,
    **extra: Any,
) -> dict[str, Any]:
    """Time one training step (forward, CE, backward into the prompts, SGD step) of ``method``."""
    _, batch = method_recipe(method)
    model = build_model(method, backbone, n_classes, variant, **extra)
    model.train()
    params = [p for _, p in model.trainable_parameters()]
    if not params:
        raise VlpromptError(
            f"method '{method}' has no trainable parameters; nothing to benchmark for training"
        )
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *_image_size(backbone), generator=g).to(device)
    labels = torch.randint(0, n_classes, (batch,), generator=g).to(device)
    use_features = variant == "fast+features"
    if use_features:
        if not _cacheable(model):
            raise ValueError(f"{method} prompts the image tower: its image features cannot be cached")
        t0 = time.perf_counter()
        feats = frozen_image_features(backbone, images)  # computed once, outside the timed step
        feature_s = time.perf_counter() - t0
        forward = _maybe_compile(lambda: model.logits_from_features(feats), cfg.compile)
    else:
        feature_s = None
        forward = _maybe_compile(lambda: model(images), cfg.compile)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(), labels)
        loss.backward()
        opt.step()

    with MemoryProbe(device) as mem:
        r = time_it(step, cfg.repeats, cfg.warmup, device)
    frozen = frozen_grads_allocated(model)
    if frozen:
        raise RuntimeError(f"{method}: {frozen} frozen CLIP tensors received gradients")
    fl = step_flops(model, batch, train=True, image_side=not use_features)
    row = {
        "method": method,
        "classes": n_classes,
        "variant": variant,
        "batch": batch,
        "ms_per_step": round(1000 * r["median_s"], 1),
        "images_per_s": round(batch / r["median_s"], 3),
        "gflop_per_step": round(fl["gflop"], 1),
        "gflops": round(fl["gflop"] / r["median_s"], 1),
        "text_tokens": _text_length(model, model.method.text_inputs(_cond_feats(model, batch))),
        "shared_prefix": shared_prefix(model, model.method.text_inputs(_cond_feats(model, batch))),
        "times_s": r["times_s"],
        "feature_extract_s": None if feature_s is None else round(feature_s, 3),
        "frozen_grads": frozen,
        "options": {k: v for k, v in dataclasses.asdict(model.options).items()},
        **mem.result(),
    }
    log.info(
        "train %s C=%d %s: %.0f ms/step (%.2f img/s), peak %.0f MB",
        method,
        n_classes,
        variant,
        row["ms_per_step"],
        row["images_per_s"],
        row["peak_mb"],
    )
    return row


def _cond_feats(model: Any, batch: int) -> torch.Tensor | None:
    if not model.method.image_conditioned_text:
        return None
    return F.normalize(torch.randn(batch, model.backbone.embed_dim, device=model.backbone.device), dim=-1)


def bench_eval(
    backbone: Any, method: str, n_classes: int, variant: str, cfg: BenchConfig, device: torch.device
) -> dict[str, Any]:
    """Time one evaluation pass over ``cfg.eval_images`` images in batches of ``cfg.eval_batch``."""
    model = build_model(method, backbone, n_classes, variant)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(cfg.eval_images, 3, *_image_size(backbone), generator=g).to(device)
    batches = list(images.split(cfg.eval_batch))
    use_features = variant == "fast+features"
    feats = None
    if use_features:  # warm cache: features of this test set were computed by an earlier evaluation
        with torch.inference_mode():
            feats = [frozen_image_features(backbone, b) for b in batches]
    forward = _maybe_compile(model, cfg.compile)

    def evaluate() -> None:
        model.eval()  # resets the text cache: text features are computed once per evaluation
        with torch.inference_mode():
            for i, b in enumerate(batches):
                if use_features:
                    model.logits_from_features(feats[i]).argmax(-1)
                else:
                    x, n = pad_batch(b, cfg.eval_batch) if cfg.compile else (b, b.shape[0])
                    forward(x)[:n].argmax(-1)

    with MemoryProbe(device) as mem:
        r = time_it(evaluate, cfg.repeats, cfg.eval_warmup, device)
    n_batches = len(batches)
    text_calls = 1 if (model.options.cache_text and not model.method.image_conditioned_text) else n_batches
    fl = step_flops(model, cfg.eval_batch, train=False, image_side=not use_features)
    img_total = fl["image_gflop"] * n_batches
    txt_total = fl["text_gflop"] * text_calls
    row = {
        "method": method,
        "classes": n_classes,
        "variant": variant,
        "images": cfg.eval_images,
        "batch": cfg.eval_batch,
        "ms": round(1000 * r["median_s"], 1),
        "images_per_s": round(cfg.eval_images / r["median_s"], 2),
        "gflop": round(img_total + txt_total, 1),
        "gflops": round((img_total + txt_total) / r["median_s"], 1),
        "text_passes": text_calls,
        "times_s": r["times_s"],
        **mem.result(),
    }
    log.info("eval %s C=%d %s: %.2f img/s", method, n_classes, variant, row["images_per_s"])
    return row


def profile_train_step(
    backbone: Any, method: str, n_classes: int, variant: str, top: int = 8
) -> list[dict[str, Any]]:
    """Where the time of one training step goes: the top operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    _, batch = method_recipe(method)
    model = build_model(method, backbone, n_classes, variant)
    model.train()
    params = [p for _, p in model.trainable_parameters()]
    images = torch.randn(batch, 3, *_image_size(backbone))
    labels = torch.randint(0, n_classes, (batch,))
    use_features = variant == "fast+features"
    feats = frozen_image_features(backbone, images) if use_features else None

    def step() -> None:
        logits = model.logits_from_features(feats) if use_features else model(images)
        F.cross_entropy(logits, labels).backward()
        for p in params:
            p.grad = None

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        {
            "op": e.key,
            "self_ms": round(e.self_cpu_time_total / 1000, 1),
            "share": round(e.self_cpu_time_total / total, 3),
        }
        for e in events[:top]
    ]


# ----------------------------------------------------------------------------------------- driver
def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other processes competing for the cores make timings noisy."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _available(methods: list[str]) -> tuple[list[str], list[str]]:
    from vlprompt.methods import list_methods

    known = set(list_methods())
    return [m for m in methods if m in known], [m for m in methods if m not in known]


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
    from vlprompt.methods import get_method

    for r in rows:
        note = get_method(r["method"]).reconstruction_note if r.get("method") else ""
        if note:
            r["reconstructed"], r["note"] = True, note
    return rows


def _method_cell(r: dict[str, Any]) -> str:
    return f"{r['method']} (reconstructed)" if r.get("reconstructed") else str(r["method"])


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
    from vlprompt.backbones import load_backbone

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
    from vlprompt.engine import attention_choices

    res["attention_choices"] = attention_choices()
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


def project_gpu_memory(backbone: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """GPU memory projection from the CPU measurement (stated as an estimate, not a GPU measurement).

    On a GPU the same step holds the fp32 weights (exact, from the parameter count) plus the
    activations and gradients measured here as the RSS increase of the step; with bf16 autocast the
    activations are about half.  CUDA context and allocator slack (~0.5-1 GB) come on top.
    """
    weights_mb = sum(p.numel() * p.element_size() for p in backbone.parameters()) / 2**20
    out = []
    for r in rows:
        act = r["delta_mb"]
        out.append(
            {
                "method": r["method"],
                "classes": r["classes"],
                "checkpoint_text": r.get("checkpoint_text"),
                "weights_mb": round(weights_mb, 1),
                "activations_mb_fp32": act,
                "projected_gpu_gb_fp32": round((weights_mb + act) / 1024 + 1.0, 2),
                "projected_gpu_gb_bf16": round((weights_mb + act / 2) / 1024 + 1.0, 2),
                "fits_16gb_fp32": (weights_mb + act) / 1024 + 1.0 <= 16,
            }
        )
    return out


# ----------------------------------------------------------------------------------------- output
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
        lines += [
            "| method | classes | checkpoint_text | ms/step | peak RSS MB | Δ MB (activations+grads) | "
            "projected GPU GB fp32 | bf16 | fits 16 GB |",
            "|---|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        for r, p in zip(res["memory"], res["memory_projection"], strict=True):
            lines.append(
                f"| {_method_cell(r)} | {r['classes']} | {_fmt(r['checkpoint_text'])} | "
                f"{_fmt(r['ms_per_step'])} | {_fmt(r['peak_mb'], 0)} | {_fmt(r['delta_mb'], 0)} | "
                f"{_fmt(p['projected_gpu_gb_fp32'], 2)} | {_fmt(p['projected_gpu_gb_bf16'], 2)} | "
                f"{_fmt(p['fits_16gb_fp32'])} |"
            )
        lines += [
            "",
            "GPU figures are projections from the CPU measurement (fp32 weights + the measured "
            "activation/gradient increase, halved for bf16, + 1 GB CUDA context), not GPU measurements.",
        ]
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
