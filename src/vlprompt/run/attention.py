"""``attention="auto"`` for runs: measure the table once per machine and shape class, reuse it, record it.

The engine runs, per shape class, whatever implementation the table it is handed names
(:class:`vlprompt.engine.AutoAttention`).  This module fills that table:

1. a run being resumed reuses the choices recorded in its ``env.json`` (``recorded``), so its numerics
   do not change with the machine's load between the kill and the resume;
2. else the machine's table in ``<cache dir>/attention-probe.json``, keyed by the machine (CPU model and
   thread count, or GPU name) and torch version, read and written under the package's file lock, so
   concurrent jobs agree and later runs reuse it;
3. else a short measured probe (both implementations on random tensors of that shape, 1 warm-up + 3
   timed calls each, the median; the explicit one must be 10 % faster to be chosen), stored in (2).

``$VLPROMPT_ATTENTION=sdpa|plain`` (or ``options.attention``) fixes one implementation instead.  What a
run used is recorded (:meth:`MeasuredTable.record`) in its ``env.json`` under ``attention`` as soon as a
class is decided, so a run killed mid-epoch still resumes with its own choices.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.engine import IMPLEMENTATIONS, AttnContext, AutoAttention, joint_mask, masked_scores
from vlprompt.engine.attention import compute_dtype, needs_grad
from vlprompt.utils import atomic_write_json, cache_dir, file_lock, read_json

ENV_FORCE = "VLPROMPT_ATTENTION"
PROBE_FILE = "attention-probe.json"
#: the explicit softmax must beat SDPA by 10 % to be chosen: near-ties (tiny shapes, timing noise) stay on
#: the fused kernel, which also never materialises the L x L scores
PLAIN_MARGIN = 1.1


def forced_implementation() -> str | None:
    """``$VLPROMPT_ATTENTION`` when it names an implementation, else None."""
    forced = os.environ.get(ENV_FORCE, "").strip().lower()
    return forced if forced in IMPLEMENTATIONS else None


def machine_name(device: torch.device) -> str:
    """What the machine's probe table is keyed by: the GPU's name, or the CPU model and thread count."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{device.type}:{model}:{torch.get_num_threads()}threads"


def _time(fn: Callable[[], None], device: torch.device, reps: int = 3) -> float:
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
    dtype = compute_dtype(x)
    grad = needs_grad(mha, x)
    g = torch.Generator(device=x.device).manual_seed(0)
    q, k, v = (torch.randn(n, h, length, d // h, device=x.device, dtype=dtype, generator=g) for _ in range(3))
    mask = joint_mask(ctx, length, x.device)
    causal = ctx.causal and length == ctx.n_inst

    def run(impl: str) -> Callable[[], None]:
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


class MeasuredTable:
    """The resolver handed to :class:`~vlprompt.engine.AutoAttention`: recorded > machine cache > probe.

    ``recorded``: a run's ``env.json["attention"]`` (its choices are reused as they are); ``on_new``:
    called with :meth:`record` whenever a class is decided (the run layer writes it to ``env.json``).
    """

    def __init__(
        self,
        device: torch.device | str,
        recorded: Mapping[str, Any] | None = None,
        on_new: Callable[[dict[str, Any]], None] | None = None,
        cache_file: Path | None = None,
    ):
        self.device = torch.device(device)
        self.forced = forced_implementation()
        self.machine = machine_name(self.device)
        self.cache_file = cache_file if cache_file is not None else cache_dir() / PROBE_FILE
        self.on_new = on_new
        self.choices: dict[str, dict[str, Any]] = {}
        for key, rec in ((recorded or {}).get("choices") or {}).items():
            if isinstance(rec, dict) and rec.get("choice") in IMPLEMENTATIONS:
                self.choices[str(key)] = {**rec, "source": "recorded"}

    def table(self) -> dict[str, str]:
        return {k: v["choice"] for k, v in self.choices.items()}

    def record(self) -> dict[str, Any]:
        """What this table decided, per shape class (a run's ``env.json["attention"]``)."""
        return {
            "mode": f"forced:{self.forced}" if self.forced else "auto",
            "machine": self.machine,
            "choices": {k: dict(v) for k, v in sorted(self.choices.items())},
        }

    def __call__(self, key: str, mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> str:
        if key not in self.choices:
            if self.forced:
                self.choices[key] = {"choice": self.forced, "source": "forced"}
            else:
                self.choices[key] = self._machine_choice(key, mha, x, ctx)
            if self.on_new is not None:
                self.on_new(self.record())
        return self.choices[key]["choice"]

    def _machine_choice(
        self, key: str, mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext
    ) -> dict[str, Any]:
        entry = f"{self.machine}|{key}"
        path = self.cache_file
        try:
            with file_lock(path.with_suffix(".lock")):
                stored = read_json(path, {})
                if not isinstance(stored, dict):
                    stored = {}
                rec = stored.get(entry)
                if (
                    isinstance(rec, dict)
                    and rec.get("choice") in IMPLEMENTATIONS
                    and rec.get("torch") == torch.__version__
                ):
                    return {**rec, "source": "probe-cache"}
                rec = probe(mha, x, ctx)
                stored[entry] = rec
                atomic_write_json(path, stored)
                return {**rec, "source": "probe"}
        except OSError:  # read-only cache dir: probe, remember for this table only
            return {**probe(mha, x, ctx), "source": "probe"}


def measured_attention(
    device: torch.device | str,
    recorded: Mapping[str, Any] | None = None,
    on_new: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[AutoAttention, MeasuredTable]:
    """An :class:`AutoAttention` filled from ``recorded``, then the machine's table (probing what is
    missing); the :class:`MeasuredTable` says what was chosen (``.record()``)."""
    table = MeasuredTable(device, recorded=recorded, on_new=on_new)
    return AutoAttention(table.table(), resolve=table), table
