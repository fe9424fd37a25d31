"""One meta-training run per directory: an exclusive lock file holding the owner's PID.

Two runs writing one directory interleave their files (``last.ckpt`` of one, ``config.yaml``
of the other, and whichever export came last). The lock is ``flock`` on
``<dir>/.learnopt-meta-train.lock``: the kernel drops it when its process dies, so a lock file
left by a killed run is stale by construction and is simply taken over.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = ".learnopt-meta-train.lock"


class RunDirectoryLocked(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """Exclusive locks on ``directories`` (created if missing), taken by ``acquire`` and
    released by ``release``; also a context manager.

    Args:
        directories: the run's directories (duplicates are locked once, in sorted order).
    """

    def __init__(self, directories: list[str | os.PathLike]) -> None:
        self.directories = sorted({Path(d).resolve() for d in directories})
        self._fds: list[int] = []

    def acquire(self) -> RunLock:
        """Lock every directory, writing this process's PID and host into its lock file; on any
        failure the locks taken so far are released.

        Returns:
            The lock itself.

        Raises:
            RunDirectoryLocked: another live process holds one of the locks.
        """
        try:
            for directory in self.directories:
                self._fds.append(_lock(directory))
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Drop the locks this object holds (the lock files stay, unlocked)."""
        for fd in self._fds:
            os.close(fd)  # closing the descriptor drops the flock; the file stays, unlocked
        self._fds = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirectoryLocked(
            f"{directory} is in use by another meta-training run ({owner}, lock file {path}); "
            "wait for it to finish or give this run its own --trainer.default_root_dir and checkpoint paths"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd
