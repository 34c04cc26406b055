"""Finding and removing what an instance's processes leave in /dev/shm.

vLLM's shared-memory message queues (``/dev/shm/psm_*``) are unlinked by their creator only on
a clean shutdown, and multiprocessing's named semaphores (``/dev/shm/sem.mp-*``) by its
resource tracker, which dies with the instance's group; a killed instance leaves them behind. The names are
random, so the forkserver learns which belong to an instance by reading the memory maps of
the instance's process group while it lives, and unlinks them once the group is gone.
"""

from __future__ import annotations

import contextlib
import os
import time

SHM_DIR = "/dev/shm"
SEGMENT_PREFIXES = ("psm_", "sem.mp-")  # SharedMemory segments; multiprocessing semaphores
ORPHAN_MIN_AGE = 60.0  # seconds: a segment this old and mapped by nobody is an orphan


def pids_by_group() -> dict[int, list[int]]:
    """Every live process, grouped by process group: one pass over /proc."""
    groups: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        # After the command name: state, ppid, pgrp, ...
        if len(fields) > 2:
            groups.setdefault(int(fields[2]), []).append(int(name))
    return groups


def group_pids(pgid: int) -> list[int]:
    """Pids of every live process in process group ``pgid``."""
    return pids_by_group().get(pgid, [])


def mapped_segments(pids: list[int]) -> set[str]:
    """Names of /dev/shm segments (vLLM's kinds) mapped by any of ``pids``."""
    found: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    path = line.rstrip("\n").split(maxsplit=5)[-1]
                    if path.startswith(SHM_DIR + "/"):
                        name = path[len(SHM_DIR) + 1 :].removesuffix(" (deleted)")
                        if name.startswith(SEGMENT_PREFIXES):
                            found.add(name)
        except OSError:
            continue
    return found


def orphan_segments(min_age: float = ORPHAN_MIN_AGE) -> set[str]:
    """vLLM-kind segments of this user that no live process maps (a killed launcher's leftovers)."""
    candidates = set()
    now = time.time()
    for name in os.listdir(SHM_DIR):
        if not name.startswith(SEGMENT_PREFIXES):
            continue
        with contextlib.suppress(OSError):
            info = os.stat(os.path.join(SHM_DIR, name))
            if info.st_uid == os.getuid() and now - info.st_mtime >= min_age:
                candidates.add(name)
    if not candidates:
        return set()
    pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    return candidates - mapped_segments(pids)


def remove_segments(names: set[str]) -> None:
    """Unlink the named /dev/shm segments that still exist."""
    for name in names:
        if "/" in name:
            continue
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.unlink(os.path.join(SHM_DIR, name))
