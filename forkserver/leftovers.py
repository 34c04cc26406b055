"""Finding and removing what an instance's processes leave in /dev/shm, and nothing else.

One rule, whatever the name: a segment is the instance's if it appeared after the instance was
forked and a process of the instance (workers included) maps or holds it open; it goes once the
instance's group is gone, unless a live process still uses it. A file that was there before the
fork (another program's, a model copied to RAM) is never the instance's, even if it maps it. A
segment is known by name *and* inode: a name unlinked and made again by someone else is another
file. vLLM's message queues (``psm_*``) are unlinked by their creator only on a clean shutdown,
multiprocessing's semaphores (``sem.mp-*``) by a resource tracker that dies with the group, and
tensor parallelism on CPU leaves ``vllm_dist_<hex>-tp:0-[0-1]-cpushm_<n>`` (8 MiB each) even after
a clean stop.

The scan is cheap when nothing changes: /dev/shm is listed once a second (one ``scandir``), and
the instances' memory maps and fds are read only when a segment of this user's that none of them
has claimed is due a look: when it appears, then once a minute (``forkserver/instances.py``), so
another program's file that stays costs little.

A launcher killed outright takes its forkserver and instances with it, and nobody unlinks
anything: so the forkserver also writes each instance's segments to a ledger
(``<tmp>/vllm-launcher-<uid>/shm-ledger/<forkserver pid>.<instance>``), and the next forkserver
removes what the ledgers of dead forkservers list (the same name and inode, not in use). Nothing
that no ledger lists is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

SHM_DIR = "/dev/shm"
# What vLLM and multiprocessing make (the tests look for these kinds).
SEGMENT_PREFIXES = ("psm_", "sem.mp-", "vllm_dist_")

Segment = tuple[str, int]  # a /dev/shm file: its name and inode


def listing() -> dict[str, int]:
    """Every file in /dev/shm: name -> inode (one scandir)."""
    found = {}
    with contextlib.suppress(OSError), os.scandir(SHM_DIR) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                found[entry.name] = entry.inode()
    return found


def owned(segments: set[Segment]) -> set[Segment]:
    """Those of ``segments`` that are still there, the same files, and this user's."""
    mine = set()
    for name, inode in segments:
        with contextlib.suppress(OSError):
            info = os.stat(os.path.join(SHM_DIR, name))
            if "/" not in name and info.st_ino == inode and info.st_uid == os.getuid():
                mine.add((name, inode))
    return mine


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


def remove_unused(segments: set[Segment]) -> set[Segment]:
    """Unlink the segments of ``segments`` that are still the same files (name and inode), are this
    user's, and that no live process uses; those removed."""
    mine = owned(segments)
    if not mine:
        return set()
    used = mapped_segments(_all_pids())
    unused = {segment for segment in mine if segment[0] not in used}
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

    def record(self, instance_id: str, segments: set[Segment]) -> None:
        """Write (replace) the segments known for ``instance_id``."""
        path = self._path(instance_id)
        with contextlib.suppress(OSError):
            with open(path + ".tmp", "w") as ledger:
                json.dump(sorted([name, inode] for name, inode in segments), ledger)
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

    def sweep_dead(self) -> set[Segment]:
        """Remove what the ledgers of forkservers no longer running list (unless in use); what went."""
        removed: set[Segment] = set()
        for entry in os.listdir(self.directory):
            owner, _, _ = entry.partition(".")
            if not owner.isdigit() or entry.endswith(".tmp") or os.path.exists(f"/proc/{owner}"):
                continue  # a live forkserver's (or a reused pid: left for later, the safe side)
            path = os.path.join(self.directory, entry)
            try:
                with open(path) as ledger:
                    listed = json.load(ledger)
            except (OSError, ValueError):
                listed = []
            # [name, inode] pairs; a bare name (an older ledger) cannot be told from a file made
            # since by someone else: it is left alone.
            segments = {(str(item[0]), item[1]) for item in listed if isinstance(item, list) and len(item) == 2
                        and isinstance(item[1], int)}  # fmt: skip
            removed |= remove_unused(segments)
            with contextlib.suppress(OSError):
                os.unlink(path)
        return removed


def remove_segments(segments: set[Segment]) -> None:
    """Unlink the /dev/shm segments that still exist."""
    for name, _ in segments:
        if "/" in name:
            continue
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.unlink(os.path.join(SHM_DIR, name))
