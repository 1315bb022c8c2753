"""What a run costs, recorded beside its results in metrics.json: a sweep's bill, run by run.

Every training records under ``metrics.json["cost"]["train"]`` and every evaluation entry under its
own ``"cost"``: wall time, process CPU time (this process and the data-loader workers it reaped),
peak resident memory, peak GPU memory where the run used a GPU (``None`` on CPU), optimiser steps,
images seen and images per second. Numbers describe *this machine*; they are never part of a run's
fingerprint and the report keeps them apart from the accuracy tables (``report/cost.md``).

Peak RSS is the phase's own where Linux lets a process reset its high-water mark
(``/proc/self/clear_refs``), else the process's lifetime peak (``peak_rss_scope`` says which). The
evaluation that ends training (the run's own test split) is timed inside the trainer; its CPU time
and peak memory are counted in the training phase.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import torch

_MB = 1024 * 1024


def _cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its reaped children (data-loader workers)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (_MB if os.uname().sysname == "Darwin" else 1024.0)


def _cuda_index(device: Any) -> int | None:
    """The CUDA device index of ``device`` when it is a GPU torch can see, else ``None``."""
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return dev.index if dev.index is not None else torch.cuda.current_device()


class Meter:
    """Measures one phase: ``m = Meter(device).start(); ...; m.stop()`` -> wall, CPU, peak memory."""

    def __init__(self, device: Any = None):
        self.device = device
        self.gpu: int | None = None
        self.scope = "process"
        self.t0 = self.c0 = 0.0

    def start(self) -> Meter:
        self.gpu = _cuda_index(self.device)
        if self.gpu is not None:
            torch.cuda.reset_peak_memory_stats(self.gpu)
        self.scope = "phase" if _reset_peak_rss() else "process"
        self.t0, self.c0 = time.perf_counter(), _cpu_seconds()
        return self

    def stop(self) -> dict[str, Any]:
        wall, cpu = time.perf_counter() - self.t0, _cpu_seconds() - self.c0
        peak_gpu = None
        if self.gpu is not None:
            torch.cuda.synchronize(self.gpu)
            peak_gpu = round(torch.cuda.max_memory_allocated(self.gpu) / _MB, 1)
        return {
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "peak_rss_scope": self.scope,
            "peak_gpu_mb": peak_gpu,
        }


def rate(images: float, seconds: float | None) -> float | None:
    return round(images / seconds, 2) if seconds and seconds > 0 else None


class EpochCounter:
    """A trainer callback: what the epochs trained in *this* process did (a resume skips the others)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []

    def __call__(self, summary: dict[str, Any]) -> None:
        self.epochs.append({k: summary.get(k) for k in ("epoch", "step", "images", "time", "eval_s")})


def train_cost(measured: dict[str, Any], result: dict[str, Any], counter: EpochCounter) -> dict[str, Any]:
    """``metrics.json["cost"]["train"]``: this attempt's wall/CPU/memory plus the whole run's work.

    ``steps``, ``images``, ``epochs`` and ``loop_s`` (seconds inside the epoch loops) cover every
    attempt (a resumed run keeps its earlier epochs' counts in the checkpoint's history); ``wall_s``,
    ``cpu_s`` and the peaks are this process's, which for a resumed run is only the last attempt
    (``resumed_from_epoch`` > 0 says so).
    """
    history = result.get("history") or []
    images = sum(int(h.get("images") or 0) for h in history)
    loop_s = float(history[-1].get("time") or 0.0) if history else 0.0
    first = counter.epochs[0]["epoch"] if counter.epochs else result.get("epochs_done", 0) + 1
    out = {
        **measured,
        "device": result.get("device"),
        "precision": result.get("precision"),
        "epochs": int(result.get("epochs_done") or 0),
        "resumed_from_epoch": int(first) - 1,
        "steps": int(result.get("steps") or 0),
        "images": images,
        "loop_s": round(loop_s, 3),
        "images_per_s": rate(images, loop_s),
    }
    eval_s = sum(float(e.get("eval_s") or 0.0) for e in counter.epochs)
    if eval_s:
        out["eval_s"] = round(eval_s, 3)  # the trainer's evaluations (inside wall_s)
    return out


def eval_cost(measured: dict[str, Any] | None, images: int, seconds: float | None = None) -> dict[str, Any]:
    """An evaluation entry's ``cost``: measured by a :class:`Meter`, or only timed (``seconds``)."""
    wall = (measured or {}).get("wall_s", seconds)
    out = dict(measured) if measured else {"wall_s": round(float(seconds or 0.0), 3)}
    out.update({"images": int(images), "images_per_s": rate(images, wall)})
    return out


__all__ = ["Meter", "EpochCounter", "train_cost", "eval_cost", "rate"]
