"""Finding and removing what an instance's processes leave in /dev/shm.

One rule, whatever the name: a segment that any process of an instance (workers included)
maps or holds open is the instance's, and it goes once the instance's group is gone, unless a
live process still uses it. vLLM's message queues (``psm_*``) are unlinked by their creator only
on a clean shutdown, multiprocessing's semaphores (``sem.mp-*``) by a resource tracker that dies
with the group, and tensor parallelism on CPU leaves ``vllm_dist_<hex>-tp:0-[0-1]-cpushm_<n>``
(8 MiB each) even after a clean stop. The forkserver learns the names by reading the memory maps
and open files of the instance's group while it lives.

A launcher killed outright takes its forkserver and instances with it, and nobody unlinks
anything: so the forkserver also writes each instance's names to a ledger
(``<tmp>/vllm-launcher-<uid>/shm-ledger/<forkserver pid>.<instance>``), and the next forkserver
removes what the ledgers of dead forkservers list, never a segment a live process uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time

SHM_DIR = "/dev/shm"
# What vLLM and multiprocessing make, for the sweep of orphans no ledger lists (older forkservers').
SEGMENT_PREFIXES = ("psm_", "sem.mp-", "vllm_dist_")
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


def mapped_segments(pids: list[int], kinds: tuple[str, ...] | None = None) -> set[str]:
    """Names of /dev/shm segments that any of ``pids`` maps or holds open (``kinds``: only those prefixes)."""
    found: set[str] = set()
    prefix = SHM_DIR + "/"
    for pid in pids:
        paths: list[str] = []
        try:
            with open(f"/proc/{pid}/maps") as maps:
                paths += [line.rstrip("\n").split(maxsplit=5)[-1] for line in maps]
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass  # exited meanwhile, or not ours to read
        for path in paths:
            if path.startswith(prefix):
                name = path[len(prefix) :].removesuffix(" (deleted)")
                if "/" not in name and (kinds is None or name.startswith(kinds)):
                    found.add(name)
    return found


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def remove_unused(names: set[str]) -> set[str]:
    """Unlink the segments of ``names`` that are this user's and that no live process uses; those removed."""
    mine = set()
    for name in names:
        with contextlib.suppress(OSError):
            if "/" not in name and os.stat(os.path.join(SHM_DIR, name)).st_uid == os.getuid():
                mine.add(name)
    if not mine:
        return set()
    unused = mine - mapped_segments(_all_pids())
    remove_segments(unused)
    return unused


def default_ledger_dir() -> str:
    """Where the forkserver keeps its ledger unless told: beside the launcher's default state."""
    return os.path.join(tempfile.gettempdir(), f"vllm-launcher-{os.getuid()}", "shm-ledger")


class Ledger:
    """Each instance's segment names on disk, so that a later forkserver can remove them."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def _path(self, instance_id: str) -> str:
        return os.path.join(self.directory, f"{os.getpid()}.{instance_id}")

    def record(self, instance_id: str, names: set[str]) -> None:
        """Write (replace) the names known for ``instance_id``."""
        path = self._path(instance_id)
        with contextlib.suppress(OSError):
            with open(path + ".tmp", "w") as ledger:
                json.dump(sorted(names), ledger)
            os.replace(path + ".tmp", path)

    def forget(self, instance_id: str) -> None:
        """The instance is gone and so are its segments."""
        with contextlib.suppress(OSError):
            os.unlink(self._path(instance_id))

    def close(self) -> None:
        """At a clean exit (every instance forgotten): remove the ledger folder, and its parent, if empty."""
        for path in (self.directory, os.path.dirname(self.directory)):
            with contextlib.suppress(OSError):
                os.rmdir(path)

    def sweep_dead(self) -> set[str]:
        """Remove what the ledgers of forkservers no longer running list (unless in use); what went."""
        removed: set[str] = set()
        for entry in os.listdir(self.directory):
            owner, _, _ = entry.partition(".")
            if not owner.isdigit() or entry.endswith(".tmp") or os.path.exists(f"/proc/{owner}"):
                continue  # a live forkserver's (or a reused pid: left for later, the safe side)
            path = os.path.join(self.directory, entry)
            try:
                with open(path) as ledger:
                    names = {str(name) for name in json.load(ledger)}
            except (OSError, ValueError):
                names = set()
            removed |= remove_unused(names)
            with contextlib.suppress(OSError):
                os.unlink(path)
        return removed


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
    return candidates - mapped_segments(_all_pids())


def remove_segments(names: set[str]) -> None:
    """Unlink the named /dev/shm segments that still exist."""
    for name in names:
        if "/" in name:
            continue
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.unlink(os.path.join(SHM_DIR, name))
