"""Device and mixed-precision choices: never hard-coded, always resolved from the config and hardware.

Learnable parameters stay fp32 (master weights); the frozen towers run under bf16 autocast on CUDA
when the GPU supports it, else fp16 autocast with a GradScaler, and in fp32 on CPU ("auto").
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from vlprompt.errors import VlpromptError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` = first CUDA device if available, else CPU; ``cuda``/``cuda:N`` must exist."""
    if isinstance(device, torch.device):
        return device
    name = str(device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise VlpromptError(f"bad device '{device}'; use auto, cpu, cuda or cuda:N") from None
        if not torch.cuda.is_available():
            raise VlpromptError(f"device '{device}' requested but CUDA is not available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise VlpromptError(
                f"device '{device}' does not exist ({torch.cuda.device_count()} CUDA device(s)); use cuda:0.."
            )
        return dev
    raise VlpromptError(f"bad device '{device}'; use auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class Precision:
    """What ``precision: auto|fp32|bf16|fp16`` means on one device."""

    name: str  # resolved: fp32 | bf16 | fp16
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def use_scaler(self) -> bool:
        return self.name == "fp16" and self.device_type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """Resolve ``auto`` for ``device``; refuse combinations the hardware cannot run."""
    p = str(precision or "auto").lower()
    if p not in ("auto", "fp32", "bf16", "fp16"):
        raise VlpromptError(f"unknown precision '{precision}'; use auto, fp32, bf16 or fp16")
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if p == "auto":
            p = "bf16" if bf16_ok else "fp16"
        elif p == "bf16" and not bf16_ok:
            raise VlpromptError("this GPU does not support bf16; use --set train.precision=fp16")
        return Precision(p, "cuda")
    if p == "auto":
        p = "fp32"
    if p == "fp16":
        raise VlpromptError(f"fp16 autocast is not supported on {device.type}; use fp32 or bf16")
    return Precision(p, device.type)


def make_scaler(precision: Precision) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler("cuda") if precision.use_scaler else None
