"""One writer per run directory: an exclusive ``flock`` on ``RUN/.lock`` holding the writer's pid.

The lock is released by the kernel when its process dies (even by ``kill -9``), so a crashed run
never blocks the next one; a second process asking for a held lock gets one line naming the pid.
A clean release removes the file (while still holding the lock); a process that locked a file which
was removed meanwhile sees that the path no longer names its file and tries again, so two writers
can never hold locks on two different ``.lock`` files of one run.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from vlprompt.errors import VlpromptError
from vlprompt.utils import lock_fd


class RunLock:
    """``with RunLock(run_dir): ...`` -- exclusive, non-blocking; re-entrant within a process."""

    _held: dict[str, int] = {}

    def __init__(self, run_dir: str | os.PathLike, name: str = ".lock"):
        self.path = Path(run_dir) / name
        self.fd: int | None = None
        self._reentered = False

    def acquire(self) -> RunLock:
        key = str(self.path.resolve())
        if key in RunLock._held:
            self._reentered = True
            RunLock._held[key] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # retried only when the file was removed between open and flock
            fd = self._open_locked()
            if fd is not None:
                break
        else:  # pragma: no cover - a file removed and re-created 100 times in a row
            raise VlpromptError(f"cannot lock {self.path}; another process keeps replacing it")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self.fd = fd
        RunLock._held[key] = 1
        return self

    def _open_locked(self) -> int | None:
        """An fd holding the flock on the file the path names now (None: it was removed, retry)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if not lock_fd(fd, blocking=False):
            holder = ""
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip()
            except OSError:
                pass
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise VlpromptError(
                f"{self.path.parent} is being written by {who}; wait for it to finish or use another --out"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            same = False
        if not same:  # its holder removed the file after we opened it
            os.close(fd)
            return None
        return fd

    def release(self) -> None:
        key = str(self.path.resolve())
        if self._reentered:
            RunLock._held[key] -= 1
            self._reentered = False
            return
        if self.fd is not None:
            RunLock._held.pop(key, None)
            try:
                os.unlink(self.path)  # removed while held: nobody can lock this file any more
            except OSError:
                pass
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
