"""Resume checkpoints: ``checkpoint/last.safetensors`` + ``checkpoint/state.pt``, each written atomically.

``state.pt`` is self-contained (learned prompt state, optimiser, schedule, python/numpy/torch RNG
states, the data loader's generator, GradScaler, epoch, per-epoch history), so a kill between the two
writes can never pair weights of one epoch with an optimiser of another: resume reads ``state.pt``
only.  ``last.safetensors`` is the same learned state in a portable format (epoch in its metadata).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlprompt.errors import VlpromptError
from vlprompt.utils import atomic_write

CKPT_DIR = "checkpoint"
WEIGHTS = "last.safetensors"
STATE = "state.pt"
FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Atomic safetensors write (contiguous CPU copies; shared storage is not allowed in the format)."""
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(data, tmp, metadata=metadata))


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    except Exception as e:
        raise VlpromptError(
            f"cannot read {path} ({type(e).__name__}); the file is corrupt -- retrain or re-export"
        ) from None


def save_checkpoint(ckpt_dir: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``last.safetensors`` then ``state.pt`` (both atomic: temp file + ``os.replace``)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    meta = {"epoch": str(state["epoch"]), "config_hash": state.get("config_hash", "")}
    save_safetensors(ckpt_dir / WEIGHTS, state["prompt"], meta)
    blob = {**state, "format_version": FORMAT_VERSION}
    atomic_write(ckpt_dir / STATE, lambda tmp: torch.save(blob, tmp))


def load_checkpoint(ckpt_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The saved resume state, or ``None`` when there is none; a damaged file is a one-line error."""
    path = Path(ckpt_dir) / STATE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise VlpromptError(
            f"resume checkpoint {path} is unreadable ({type(e).__name__}); "
            f"delete {Path(ckpt_dir)} to start over"
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise VlpromptError(
            f"resume checkpoint {path} has an unknown format; delete {Path(ckpt_dir)} to start over"
        )
    return state


def describe(state: dict[str, Any]) -> str:
    return json.dumps({"epoch": state.get("epoch"), "step": state.get("step")})
