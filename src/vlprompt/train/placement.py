"""Where one process trains: its device, its resolved precision and its role under DDP.

Resolved once per run: the run layer resolves it with the rest of the request (``run/request.py``) and
hands it to :func:`~vlprompt.train.fit`; ``fit`` resolves it from ``cfg.train`` only when none is given
(library use).  Under ``torchrun`` resolving joins the process group (a no-op otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlprompt.train import distributed as ddp
from vlprompt.train.precision import Precision, resolve_device, resolve_precision


@dataclass(frozen=True)
class Placement:
    """``device``: this rank's device; ``precision``: resolved (never ``auto``); ``main``: rank 0 (or
    a single process), the one that evaluates and writes."""

    device: torch.device
    precision: Precision
    main: bool = True


def resolve_placement(device: str | torch.device | None = "auto", precision: str = "auto") -> Placement:
    """``train.device`` / ``train.precision`` resolved for this process (DDP joined under torchrun)."""
    main = ddp.init_from_env(device).is_main
    dev = ddp.rank_device(resolve_device(device))
    return Placement(dev, resolve_precision(precision, dev), main)
