"""Attention modes: the seam where a block's self-attention is computed.

An attention mode is a callable ``(mha, x, ctx) -> out``: ``mha`` is the block's frozen
``nn.MultiheadAttention`` (we only read its projection weights), ``x`` the layer-normed tokens
``(N, L, D)`` and ``ctx`` an :class:`AttnContext` saying how many leading tokens are instances,
whether instances attend causally (text tower) and which instance keys prompts may read.
No Python loop over heads or tokens.

Two exact implementations -- fused ``F.scaled_dot_product_attention`` ("sdpa") and the explicit
``softmax(QK^T/sqrt(d)) V`` ("plain") -- differ only in rounding and speed, and which is faster depends
on the device, the dtype and the shape (on a 2-core EPYC, SDPA is 2-3x faster on the image tower's
197 tokens while plain wins on 1000 short text sequences). ``"auto"`` (:func:`auto_attention`, the
default) picks per *shape class* -- device, compute dtype, grad on/off, mask kind, heads, head width,
sequence length and the batch rounded up to a power of two -- by a short measured probe (both
implementations on random tensors of that shape, 1 warm-up + 3 timed calls each, the median; the
explicit one must be 10 % faster to be chosen),
cached in memory and in ``<cache dir>/attention-probe.json`` (locked, so concurrent jobs agree and later
runs reuse it). ``$VLPROMPT_ATTENTION=sdpa|plain`` forces one implementation; under ``torch.compile``
auto uses SDPA. :func:`attention_choices` lists what this process chose (recorded in a run's env).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttnContext:
    n_inst: int  # x[:, :n_inst] are instance tokens, x[:, n_inst:] prompt tokens
    causal: bool = False  # instance->instance attention is causal (text tower)
    key_valid: torch.Tensor | None = None  # (N, n_inst) bool: instance keys prompts may read
    layer: int = 0


class Attention(Protocol):
    def __call__(self, mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor: ...


def qkv_heads(mha: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project ``x`` with the block's frozen in-projection into per-head ``(N, H, L, hd)`` q, k, v."""
    n, length, d = x.shape
    h = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    qkv = qkv.view(n, length, 3, h, d // h).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(mha: nn.MultiheadAttention, o: torch.Tensor) -> torch.Tensor:
    """``(N, H, L, hd)`` -> ``(N, L, D)`` through the block's frozen out-projection."""
    n, h, length, hd = o.shape
    o = o.transpose(1, 2).reshape(n, length, h * hd)
    return F.linear(o, mha.out_proj.weight, mha.out_proj.bias)


def joint_mask(ctx: AttnContext, length: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask (True = may attend) over ``[instances; prompts]``, or None when no mask is needed.

    Instances attend to instances causally in the text tower and to every prompt; prompts attend
    to every prompt and to the valid instance keys (``key_valid``: in the text tower the tokens up
    to each sequence's end-of-text, so padding never leaks into prompts).
    """
    n_inst = ctx.n_inst
    if not ctx.causal and ctx.key_valid is None:
        return None
    m = torch.ones(length, length, dtype=torch.bool, device=device)
    if ctx.causal:
        m[:n_inst, :n_inst] = torch.ones(n_inst, n_inst, dtype=torch.bool, device=device).tril()
    if ctx.key_valid is None or length == n_inst:
        return m
    m = m.unsqueeze(0).repeat(ctx.key_valid.shape[0], 1, 1)
    m[:, n_inst:, :n_inst] = ctx.key_valid.unsqueeze(1)
    return m.unsqueeze(1)  # (N, 1, L, L)


def standard_attention(mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """Frozen CLIP multi-head attention over the whole sequence (instances and prompts jointly)."""
    q, k, v = qkv_heads(mha, x)
    length = x.shape[1]
    if length == ctx.n_inst:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=ctx.causal)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=joint_mask(ctx, length, x.device))
    return merge_heads(mha, o)


def plain_attention(mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """Explicit ``softmax(QK^T/sqrt(d) + mask) V`` -- the reference implementations' computation.

    Same result as :func:`standard_attention` up to rounding (tested); the reference implementations'
    computation (``vlprompt bench --reference``) and :func:`auto_attention`'s alternative to SDPA.
    """
    q, k, v = qkv_heads(mha, x)
    length = x.shape[1]
    mask = joint_mask(ctx, length, x.device)
    o = masked_scores(q, k, mask).softmax(dim=-1) @ v
    return merge_heads(mha, o)


ENV_FORCE = "VLPROMPT_ATTENTION"
#: the explicit softmax must beat SDPA by 10 % to be chosen: near-ties (tiny shapes, timing noise) stay on
#: the fused kernel, which also never materialises the L x L scores
PLAIN_MARGIN = 1.1
_CHOICES: dict[str, dict[str, Any]] = {}  # shape class -> {"choice", "sdpa_ms", "plain_ms", "source"}
_LOCK = threading.RLock()


def _mask_kind(ctx: AttnContext, length: int) -> str:
    if length == ctx.n_inst:
        return "causal" if ctx.causal else "none"
    return "mask" if (ctx.causal or ctx.key_valid is not None) else "none"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    with contextlib.suppress(AttributeError, RuntimeError):
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    return x.dtype


def device_name(device: torch.device) -> str:
    """What the probe cache is keyed by: the GPU's name, or the CPU model and thread count."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{device.type}:{model}:{torch.get_num_threads()}threads"


def shape_class(mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> str:
    n, length, d = x.shape
    h = mha.num_heads
    nb = 1 << max(0, int(n - 1).bit_length())
    grad = (
        "grad"
        if torch.is_grad_enabled() and (x.requires_grad or mha.in_proj_weight.requires_grad)
        else "nograd"
    )
    dtype = str(_compute_dtype(x)).replace("torch.", "")
    return f"{device_name(x.device)}|{dtype}|{grad}|{_mask_kind(ctx, length)}|H{h}xhd{d // h}|L{length}|N{nb}"


def _probe_file() -> Path:
    from vlprompt.utils import cache_dir  # lazy: engine stays importable without side effects

    return cache_dir() / "attention-probe.json"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+b") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except ImportError:
            pass
        yield


def _time(fn, device: torch.device, reps: int = 3) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def probe(mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> dict[str, Any]:
    """Time both implementations on random q, k, v of this call's shape (forward, + backward if grad)."""
    n, length, d = x.shape
    h = mha.num_heads
    dtype = _compute_dtype(x)
    grad = torch.is_grad_enabled() and (x.requires_grad or mha.in_proj_weight.requires_grad)
    g = torch.Generator(device=x.device).manual_seed(0)
    q, k, v = (torch.randn(n, h, length, d // h, device=x.device, dtype=dtype, generator=g) for _ in range(3))
    mask = joint_mask(ctx, length, x.device)
    causal = ctx.causal and length == ctx.n_inst

    def run(impl: str):
        def fn() -> None:
            qq = q.detach().requires_grad_(grad)
            with torch.autocast(x.device.type, enabled=False):
                if impl == "sdpa":
                    o = F.scaled_dot_product_attention(
                        qq, k, v, attn_mask=mask, is_causal=causal and mask is None
                    )
                else:
                    m = mask if mask is not None or not causal else torch.ones(
                        length, length, dtype=torch.bool, device=x.device).tril()  # fmt: skip
                    o = masked_scores(qq, k, m).softmax(dim=-1) @ v
                if grad:
                    o.sum().backward()

        return fn

    # identity saved-tensor hooks: inside a checkpointed block the probe's own backward must not
    # trigger the block's recomputation
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    with torch.no_grad() if not grad else contextlib.nullcontext(), hooks:
        sdpa_ms, plain_ms = _time(run("sdpa"), x.device), _time(run("plain"), x.device)
    return {
        "choice": "plain" if plain_ms * PLAIN_MARGIN < sdpa_ms else "sdpa",
        "sdpa_ms": round(sdpa_ms, 4),
        "plain_ms": round(plain_ms, 4),
        "torch": torch.__version__,
    }


def choose_attention(mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> str:
    """``"sdpa"`` or ``"plain"`` for this call: forced by ``$VLPROMPT_ATTENTION``, else the cached probe."""
    forced = os.environ.get(ENV_FORCE, "").strip().lower()
    if forced in ("sdpa", "plain"):
        return forced
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)()
    if compiling:
        return "sdpa"
    key = shape_class(mha, x, ctx)
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit["choice"]
    with _LOCK:
        if key in _CHOICES:
            return _CHOICES[key]["choice"]
        path = _probe_file()
        try:
            with _file_lock(path):
                stored = {}
                with contextlib.suppress(OSError, ValueError):
                    stored = json.loads(path.read_text(encoding="utf-8"))
                rec = stored.get(key)
                source = "probe-cache"
                if (
                    not isinstance(rec, dict)
                    or rec.get("choice") not in ("sdpa", "plain")
                    or (rec.get("torch") != torch.__version__)
                ):
                    rec, source = probe(mha, x, ctx), "probe"
                    stored[key] = rec
                    from vlprompt.utils import atomic_write_json

                    atomic_write_json(path, stored)
                _CHOICES[key] = {**rec, "source": source}
        except OSError:  # read-only cache dir: probe, remember in memory only
            _CHOICES[key] = {**probe(mha, x, ctx), "source": "probe"}
    return _CHOICES[key]["choice"]


def auto_attention(mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """The faster exact implementation for this device/dtype/shape class (see the module docstring)."""
    impl = choose_attention(mha, x, ctx)
    return (standard_attention if impl == "sdpa" else plain_attention)(mha, x, ctx)


def attention_choices() -> dict[str, Any]:
    """What ``attention="auto"`` chose in this process, per shape class (for a run's env.json)."""
    forced = os.environ.get(ENV_FORCE, "").strip().lower()
    return {
        "mode": f"forced:{forced}" if forced in ("sdpa", "plain") else "auto",
        "choices": {k: dict(v) for k, v in sorted(_CHOICES.items())},
    }


ATTENTION_MODES = {"auto": auto_attention, "sdpa": standard_attention, "plain": plain_attention}


def masked_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled scores ``QK^T/sqrt(d)`` with ``-inf`` where ``mask`` is False (used for exact gates)."""
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s
