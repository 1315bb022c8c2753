"""Small shared helpers: atomic writes, the file lock, hashing, seeding."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; atomic renames still keep files whole
    fcntl = None  # type: ignore[assignment]

import numpy as np
import torch

from vlprompt.errors import VlpromptError

TMP_SUFFIX = ".tmp"
#: what reading a JSON file can raise: missing or unreadable, not UTF-8, not JSON
JSON_READ_ERRORS = (OSError, UnicodeDecodeError, json.JSONDecodeError)
_RAISE = object()


def read_json(
    path: str | os.PathLike, default: Any = _RAISE, *, error: str = "cannot read {path} ({reason})"
) -> Any:
    """The parsed JSON file; when it is missing, unreadable or not JSON: ``default`` if given, else a
    one-line :class:`VlpromptError`: ``error`` formatted with ``{path}``, ``{parent}``, ``{reason}``
    (the exception's type) and ``{detail}`` (its message)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except JSON_READ_ERRORS as e:
        if default is not _RAISE:
            return default
        msg = error.format(path=path, parent=Path(path).parent, reason=type(e).__name__, detail=e)
        raise VlpromptError(msg) from None


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The records of a JSON-lines file ([] when it is missing); a line cut by a kill is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def lock_fd(fd: int, blocking: bool = True) -> bool:
    """Take the exclusive advisory lock (``flock``) on an open file: the package's one file lock.

    The kernel drops it when the file is closed or its process dies (even by ``kill -9``), so a crash
    never leaves a lock behind.  Returns False when ``blocking`` is off and another process holds it;
    True on a system without ``flock`` (atomic renames still keep every file whole)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[int]:
    """``with file_lock(path):`` -- wait for and hold the exclusive lock on ``path`` (created if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        lock_fd(fd)
        yield fd
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (read without changing it where /proc allows; else set-and-restore)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write a file atomically: ``write(tmp_path)`` then rename over ``path``.

    An interrupted run therefore never leaves a half-written checkpoint or result.  The file gets
    the mode an ordinary ``open()`` would give it (0666 less the umask), not mkstemp's private 0600,
    so a colleague can read a shared run or an exported prompt.  A temp file orphaned by a kill is
    named ``.<name>.<random>.tmp``; the run layer removes its own (``RunDir.remove_stale_temps``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, _w)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch exactly as the reference toolkit's ``set_random_seed``."""

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cache_dir() -> Path:
    """Where vlprompt keeps generated data (demo set, few-shot picks, feature caches)."""
    root = os.environ.get("VLPROMPT_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vlprompt"
    )
    return Path(root)
