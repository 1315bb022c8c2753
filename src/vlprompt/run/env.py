"""What a run records about the machine it ran on: enough to tell two setups apart, nothing private.

The hostname is recorded only when ``VLPROMPT_RECORD_HOSTNAME=1`` (a run directory is meant to be
shared); paths never appear here.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import open_clip
import torch

from vlprompt.version import __version__

RECORD_HOSTNAME_ENV = "VLPROMPT_RECORD_HOSTNAME"


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Versions, git revision, device (and ``extra``, e.g. the attention implementation chosen)."""

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", None),
        "vlprompt": __version__,
        "git_revision": git_revision(),
        "device": device,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name() if (device or "").startswith("cuda") else None,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if os.environ.get(RECORD_HOSTNAME_ENV, "") in ("1", "true", "yes"):
        env["hostname"] = socket.gethostname()
    env.update(extra or {})
    return env
