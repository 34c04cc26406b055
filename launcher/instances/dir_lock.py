"""One launcher per log directory: a lock held for the launcher's life.

The default log directory is named after ``--port`` (``<tmp>/vllm-launcher-<uid>/<port>/logs``),
but ``uvicorn launcher.app:app --port P`` listens on a port the settings never hear of: two
launchers could share a directory, and the second one's start-up sweep would delete the live
logs of the first one's instances. So the directory is locked (``flock`` on ``.launcher.lock``,
released by the kernel when the process ends, however it ends) before anything in it is swept,
and a second launcher refuses to start, naming the directory and the owner.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
from collections.abc import Sequence

LOCK_FILE = ".launcher.lock"
_held: dict[str, int] = {}  # directory -> the open lock file, for this process's life


class DirectoryInUse(RuntimeError):
    """Another live launcher holds the directory."""


def lock(directory: str) -> None:
    """Hold ``directory`` for this process (again: no-op); :class:`DirectoryInUse` if another has it."""
    directory = os.path.abspath(directory)
    if directory in _held:
        return
    path = os.path.join(directory, LOCK_FILE)
    for attempt in itertools.count():
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            if attempt < 100:
                continue  # a launcher letting the default directory go removed it meanwhile: make it again
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DirectoryInUse(
                f"the log directory {directory} is in use by another launcher (pid {owner}); give this one its own "
                "--log-dir (LAUNCHER_LOG_DIR), or --port if it uses the default"
            ) from None
        if _names(path, fd):
            break
        # The launcher we waited on released it, and removed the file we had opened: a lock on that
        # file holds nothing (the next launcher makes a new one). Lock the file the path names now.
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held[directory] = fd


def _names(path: str, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def release(directory: str, *, remove_empty: Sequence[str] = ()) -> None:
    """Let ``directory`` go (its lock file removed, then closed: a launcher that opened it meanwhile
    sees it gone once it locks, and locks the path anew), then remove each of ``remove_empty`` that is empty."""
    directory = os.path.abspath(directory)
    fd = _held.pop(directory, None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(directory, LOCK_FILE))
    os.close(fd)
    for path in remove_empty:
        with contextlib.suppress(OSError):  # not empty (another launcher's, a user's file): kept
            os.rmdir(path)
