"""The measurements: image and text tower forward, one training step, one evaluation pass, and
a profile of a step."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from vlprompt.bench.config import BenchConfig
from vlprompt.bench.flops import (
    image_tower_flops,
    text_tower_flops,
)
from vlprompt.bench.measure import MemoryProbe, time_it
from vlprompt.bench.models import (
    _cacheable,
    _text_length,
    build_model,
    frozen_grads_allocated,
    measured,
    method_recipe,
    shared_prefix,
    step_flops,
)
from vlprompt.engine import attention_mode, encode_text
from vlprompt.errors import VlpromptError
from vlprompt.train.features import frozen_image_features

log = logging.getLogger(__name__)


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


def bench_image_tower(
    backbone: Any, cfg: BenchConfig, device: torch.device, peak: float
) -> list[dict[str, Any]]:
    """Frozen image-tower forward at ``cfg.image_batch``: the default (auto) attention, and with
    ``--reference`` each fixed implementation (SDPA, the plain reference) for comparison."""
    images = torch.randn(cfg.image_batch, 3, *_image_size(backbone), device=device)
    flops = image_tower_flops(backbone.clip.visual, cfg.image_batch).forward
    rows = []
    for attention in ["auto", "sdpa", "plain"] if cfg.reference else ["auto"]:
        mode = measured(device)[0] if attention == "auto" else attention
        fn = _maybe_compile(lambda a=mode: frozen_image_features(backbone, images, a), cfg.compile)
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
                    backbone.clip,
                    embeds,
                    eot,
                    None,
                    truncate=True,
                    default_attention=attention_mode(a, measured(device)[0]),
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
    batch: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Time one training step (forward, CE, backward into the prompts, SGD step) of ``method`` at its
    official batch (or ``batch``: the run's own, for the projection of a grid)."""
    _, official = method_recipe(method)
    batch = int(batch or official)
    model = build_model(method, backbone, n_classes, variant, **extra)
    model.train()
    params = list(model.trainable_parameters())
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

    _, batch = method_recipe(method)
    model = build_model(method, backbone, n_classes, variant)
    model.train()
    params = list(model.trainable_parameters())
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
