"""The one file lock of the template: a run directory, a sweep's state file and each sweep trial are held
with it. Built on ``filelock`` (flock), so a lock dies with its process and no stale lock outlives a SIGKILL.
"""

import os
import socket
import sys
import time
from pathlib import Path

import filelock


class Busy(Exception):
    """Another live process holds the lock; ``holder`` is what that process wrote into the lock file."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


def describe_this_process() -> str:
    command = " ".join(sys.argv[:4])
    return f"process {os.getpid()} on {socket.gethostname()} ({command}..., since {time.strftime('%Y-%m-%d %H:%M:%S')})"


class ProcessLock:
    """An exclusive lock on ``path``, held by this process until :meth:`release` or its death; the lock file
    is removed on release. ``wait``: block until it is free (for short holds), else raise :class:`Busy`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = filelock.FileLock(
            self.path,
            thread_local=False,
            fallback_to_soft=False,  # a soft (marker-file) lock would outlive a killed holder
            # filelock records no holder for a flock (its ``pid`` reads only soft markers): we write our own line.
            on_acquired=_write_holder,
        )

    def acquire(self, wait: bool = False) -> "ProcessLock":
        try:
            self._lock.acquire(blocking=wait)
        except filelock.Timeout:
            raise Busy(self.path, holder(self.path)) from None
        _held.add(self)
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            # filelock keeps a Unix lock file; we remove it while still held (a waiter that locked the
            # unlinked inode sees st_nlink == 0 and retries), so a released run leaves no run.lock behind.
            self.path.unlink(missing_ok=True)
            self._lock.release()
        _held.discard(self)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def __enter__(self) -> "ProcessLock":
        return self.acquire(wait=True)

    def __reduce__(self):
        # ddp_spawn pickles the trainer, and with it the run: its processes get an unheld lock on the same path
        # (the lock stays this process's; a filelock carries a thread lock, which cannot be pickled).
        return (type(self), (self.path,))

    def __exit__(self, *exc) -> None:
        self.release()


#: Held locks stay referenced until released: filelock releases a lock its object's finalizer sees, and a
#: lock must last as long as its process even when the caller keeps no reference (``RunLock(d).acquire()``).
_held: set[ProcessLock] = set()


def _write_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, describe_this_process().encode(), 0)


def holder(path: Path) -> str:
    """What the holder of ``path`` wrote about itself ("another process" if nothing yet)."""
    try:
        return path.read_text(errors="replace").strip() or "another process"
    except OSError:
        return "another process"


def is_held(path: str | Path) -> bool:
    """Whether a live process holds the lock on ``path``: probed with filelock's own primitive on a
    read-only descriptor, so the probe neither creates, truncates nor removes the file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        if filelock.lock_descriptor(fd, blocking=False):
            filelock.unlock_descriptor(fd)
            return False
        return True
    finally:
        os.close(fd)
