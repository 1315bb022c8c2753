"""How the bench measures: device description, timing (median after warm-up), memory peaks and the
matmul peak."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlprompt.bench.flops import (
    matmul_flops,
)

log = logging.getLogger(__name__)


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


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other processes competing for the cores make timings noisy."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
