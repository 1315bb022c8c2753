"""Resume checkpoints without pickle: ``checkpoint/state.json`` + ``checkpoint/state-<sha>.safetensors``.

The resume state (learned prompt, optimiser, schedule, python/numpy/torch RNG states, the data
loader's generator, GradScaler, method hooks, epoch, per-epoch history) is a nested structure of
dicts, lists, numbers, strings and tensors.  :func:`encode` splits it into a JSON tree whose tensor
leaves are references into one safetensors file, so nothing in a run directory is ever unpickled.
Both files are written atomically, tensors first; ``state.json`` names its tensor file and carries its
sha256, so a kill between the writes can never pair weights of one epoch with an optimiser of
another.  ``last.safetensors`` is the learned prompt alone (portable).

``state.json`` also records the sha256 of its own state tree, so an edited epoch or optimiser entry is
refused on resume (checkpoints of an older vlprompt have none and are read as before).
A ``state.pt`` from an older vlprompt (a pickle) is never opened: resume refuses it with one line.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vlprompt.errors import VlpromptError
from vlprompt.utils import atomic_write, atomic_write_json, read_json, sha256_file, sha256_json

WEIGHTS = "last.safetensors"
TENSORS_PREFIX, TENSORS_SUFFIX = "state-", ".safetensors"
STATE = "state.json"
LEGACY_PICKLE = "state.pt"
FORMAT_VERSION = 2


# ----------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(x) for x in py[1]), py[2] if py[2] is None else float(py[2])))
    npst = state["numpy"]
    np.random.set_state(
        (str(npst[0]), np.asarray(npst[1], dtype=np.uint32), int(npst[2]), int(npst[3]), float(npst[4]))
    )
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in state["cuda"]])


# ----------------------------------------------------------------------------------------- encoding
def encode(obj: Any, tensors: dict[str, torch.Tensor], path: str = "s") -> Any:
    """A JSON-able tree for ``obj``; tensors (and numpy arrays) go into ``tensors`` under their path."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(
            np.ascontiguousarray(obj).astype(np.int64 if obj.dtype.kind in "ui" else np.float64)
        )
        return {"__ndarray__": path, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj and "__ndarray__" not in obj:
            return {k: encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {
            "__items__": [
                [encode(k, tensors, f"{path}.k{i}"), encode(v, tensors, f"{path}.v{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        if isinstance(obj, float) and not np.isfinite(obj):
            return {"__float__": repr(obj)}
        return obj
    raise TypeError(
        f"cannot store {type(obj).__name__} at {path} in a checkpoint (tensors, numbers, "
        "strings, lists and dicts only)"
    )


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__ndarray__" in tree:
            return tensors[tree["__ndarray__"]].numpy().astype(tree["dtype"])
        if "__tuple__" in tree:
            return tuple(decode(v, tensors) for v in tree["__tuple__"])
        if "__items__" in tree:
            return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in tree["__items__"]}
        if "__float__" in tree:
            return float(tree["__float__"])
        return {k: decode(v, tensors) for k, v in tree.items()}
    return tree


def _hashable(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


# ----------------------------------------------------------------------------------------- files
def save_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Atomic safetensors write (contiguous CPU copies; shared storage is not allowed in the format)."""

    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        try:
            safetensors.torch.save_file(data, tmp, metadata=metadata)  # looked up at call time
        except OSError:
            raise
        except Exception as e:  # safetensors reports a full disk / failed write as its own error type
            raise OSError(28 if "space" in str(e).lower() else 5, f"cannot write {path} ({e})") from None

    atomic_write(path, write)


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    except FileNotFoundError:
        raise VlpromptError(f"file not found: {path}; pass an existing prompt/run") from None
    except Exception as e:
        raise VlpromptError(
            f"cannot read {path} ({type(e).__name__}); the file is corrupt -- retrain or re-export"
        ) from None


def save_checkpoint(ckpt_dir: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``last.safetensors``, the tensors, then ``state.json`` (each atomic).

    The tensor file is named by its content (``state-<sha256[:16]>.safetensors``) and ``state.json``
    names it, so a kill or a failed write at any point leaves the previous, consistent pair in place;
    older tensor files are removed only after the new ``state.json`` is in place.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    meta = {"epoch": str(state["epoch"]), "config_hash": str(state.get("config_hash", ""))}
    save_safetensors(ckpt_dir / WEIGHTS, state["prompt"], meta)
    tensors: dict[str, torch.Tensor] = {}
    tree = encode(state, tensors)
    staging = ckpt_dir / f"{TENSORS_PREFIX}new{TENSORS_SUFFIX}"
    save_safetensors(staging, tensors, {"format_version": str(FORMAT_VERSION)})
    digest = sha256_file(staging)
    name = f"{TENSORS_PREFIX}{digest[:16]}{TENSORS_SUFFIX}"
    os.replace(staging, ckpt_dir / name)
    atomic_write_json(
        ckpt_dir / STATE,
        {
            "format_version": FORMAT_VERSION,
            "tensors": name,
            "tensors_sha256": digest,
            "state_sha256": sha256_json(tree),  # checked on resume: an edited state.json is refused
            "state": tree,
        },
    )
    for old in ckpt_dir.glob(f"{TENSORS_PREFIX}*{TENSORS_SUFFIX}"):
        if old.name != name:
            old.unlink(missing_ok=True)


def has_checkpoint(ckpt_dir: str | os.PathLike) -> bool:
    d = Path(ckpt_dir)
    return (d / STATE).is_file() or (d / LEGACY_PICKLE).is_file()


def load_checkpoint(ckpt_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The saved resume state, or ``None`` when there is none; a damaged file is a one-line error."""
    d = Path(ckpt_dir)
    path = d / STATE
    if not path.is_file():
        if (d / LEGACY_PICKLE).is_file():
            raise VlpromptError(
                f"{d / LEGACY_PICKLE} is a pickle from an older vlprompt and is never loaded (it could run "
                f"code); delete {d} or pass --force to start the run over"
            )
        return None
    head = read_json(
        path, error="resume checkpoint {path} is unreadable ({reason}); delete {parent} to start over"
    )
    if not isinstance(head, dict) or head.get("format_version") != FORMAT_VERSION:
        raise VlpromptError(f"resume checkpoint {path} has an unknown format; delete {d} to start over")
    tname = str(head.get("tensors", ""))
    tfile = d / Path(tname).name
    if not tname or not tfile.is_file() or sha256_file(tfile) != head.get("tensors_sha256"):
        raise VlpromptError(
            f"resume checkpoint in {d} is incomplete (its tensor file does not match {STATE}, an interrupted "
            f"write); delete {d} to start over"
        )
    recorded = head.get("state_sha256")  # absent in checkpoints of an older vlprompt: not checked
    if recorded is not None and sha256_json(head.get("state")) != recorded:
        raise VlpromptError(
            f"resume checkpoint {path} does not match the sha256 recorded in it (edited or damaged); "
            f"delete {d} or pass --force to start the run over"
        )
    tensors, _ = load_safetensors(tfile)
    try:
        state = decode(head["state"], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise VlpromptError(
            f"resume checkpoint {path} is damaged ({type(e).__name__}); delete {d} to start over"
        ) from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise VlpromptError(f"resume checkpoint {path} is damaged; delete {d} to start over")
    return state


def describe(state: dict[str, Any]) -> str:
    return json.dumps({"epoch": state.get("epoch"), "step": state.get("step")})
