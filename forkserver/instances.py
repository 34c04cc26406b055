"""The forkserver's instances: stopping them with a deadline, reaping them, cleaning up after them.

No sockets here: :class:`InstanceTable` is driven by the server loop, which calls
:meth:`InstanceTable.tick` after every wake-up and reports finished instances to its clients.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from forkserver import leftovers, osutil

SWEEP_INTERVAL = 0.05  # seconds between checks that a dead instance's group is empty
UNCLAIMED_EXIT_SECONDS = 10.0  # how long the exit of a child not known (yet) is kept
SHM_SCAN_INTERVAL = 1.0  # seconds between looks at which /dev/shm segments live instances map
# A segment no instance claimed at its first look (another program's, most likely) is looked at
# again this often, and at every stop: an instance that maps it later is still seen, and a file
# that stays costs a pass over the instances' maps (milliseconds each) a minute, not every second.
SHM_RELOOK_SECONDS = 60.0


@dataclass
class Instance:
    """What the forkserver knows about one forked instance."""

    instance_id: str
    pid: int  # also its process group and session id
    model: str
    port: int
    log_path: str
    tmpdir: str
    forked_at: float
    stop_deadline: float | None = None
    exit_code: int | None = None  # set when the main process is reaped
    stopped_at: float | None = None  # set when no process of the group is left
    shm_segments: set[leftovers.Segment] = field(default_factory=set)  # its own: removed once the group is gone
    meta: dict[str, Any] = field(default_factory=dict)  # the API's own notes, returned by hello
    # /dev/shm as it was just before the fork: none of it is ever the instance's.
    shm_before: frozenset[leftovers.Segment] = field(default_factory=frozenset)
    zygote_pid: int | None = None  # the zygote it was forked from (whose weights it shares)

    @property
    def finished(self) -> bool:
        """True once no process of the instance is left."""
        return self.stopped_at is not None

    def remember_segments(
        self, groups: dict[int, list[int]] | None = None, shm: dict[str, int] | None = None
    ) -> bool:
        """Note the /dev/shm segments made since the fork that the instance's processes map or
        hold open right now; True if new ones.

        ``groups`` (from :func:`leftovers.pids_by_group`) and ``shm`` (from
        :func:`leftovers.listing`) save a pass over /proc and /dev/shm per instance when many are
        scanned at once.
        """
        shm = leftovers.listing() if shm is None else shm
        fresh = {(name, inode) for name, inode in shm.items()} - self.shm_before - self.shm_segments
        if not fresh:
            return False  # nothing new in /dev/shm: no maps to read
        pids = groups.get(self.pid, []) if groups is not None else leftovers.group_pids(self.pid)
        mapped = leftovers.mapped_segments(pids)
        ours = {segment for segment in fresh if segment[0] in mapped}
        self.shm_segments |= ours
        return bool(ours)

    def describe(self) -> dict[str, Any]:
        """The instance as the protocol reports it."""
        return {
            "instance_id": self.instance_id,
            "pid": self.pid,
            "model": self.model,
            "port": self.port,
            "log_path": self.log_path,
            "forked_at": self.forked_at,
            "exit_code": self.exit_code if self.finished else None,
            "stopped_at": self.stopped_at,
            "running": not self.finished,
            "meta": self.meta,
            **({"zygote_pid": self.zygote_pid} if self.zygote_pid is not None else {}),
        }


class InstanceTable:
    """Every instance the forkserver forked and has not forgotten yet."""

    def __init__(
        self,
        on_finished: Callable[[Instance], None],
        ledger: leftovers.Ledger | None = None,
        on_other_exit: Callable[[int, int], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_finished = on_finished
        self._ledger = ledger
        self._clock = clock
        # A child that is not an instance exited (pid, status): True if the callee knew it (a zygote).
        self._on_other_exit = on_other_exit
        # Children reaped before they were added (an instance forked by a zygote may die before
        # the forkserver reads its pid): pid -> (wait status, when), the latest few.
        self._unclaimed_exits: dict[int, tuple[int, float]] = {}
        self._instances: dict[str, Instance] = {}
        self._by_pid: dict[int, Instance] = {}
        self._next_shm_scan = clock() + SHM_SCAN_INTERVAL
        self._unclaimed: dict[leftovers.Segment, float] = {}  # segments no instance claimed: when to look next

    def add(self, instance: Instance, *, may_be_reaped: bool = False) -> None:
        """Track a freshly forked instance. ``may_be_reaped``: it was not forked by us (a zygote
        forked it), so its exit may have been reaped already, in the last few seconds."""
        self._instances[instance.instance_id] = instance
        reaped = self._unclaimed_exits.pop(instance.pid, None) if may_be_reaped else None
        if reaped is not None and time.monotonic() - reaped[1] < UNCLAIMED_EXIT_SECONDS:
            instance.exit_code = osutil.exit_code_from_status(reaped[0])
            osutil.signal_group(instance.pid, signal.SIGKILL)
        else:
            self._by_pid[instance.pid] = instance

    def get(self, instance_id: object) -> Instance | None:
        """The instance named ``instance_id``, if any."""
        return self._instances.get(instance_id) if isinstance(instance_id, str) else None

    def forget(self, instance: Instance) -> None:
        """Drop a finished instance."""
        self._instances.pop(instance.instance_id, None)

    def all(self) -> list[Instance]:
        """Every tracked instance, finished or not."""
        return list(self._instances.values())

    def live(self) -> list[Instance]:
        """Instances with a process left."""
        return [instance for instance in self._instances.values() if not instance.finished]

    def stop(self, instance: Instance, grace: float) -> None:
        """SIGTERM the instance's group now, SIGKILL it ``grace`` seconds later."""
        if instance.finished or instance.exit_code is not None:
            return
        instance.remember_segments()
        deadline = self._clock() + grace
        if instance.stop_deadline is None or deadline < instance.stop_deadline:
            instance.stop_deadline = deadline
        osutil.signal_instance(instance.pid, signal.SIGTERM)
        if grace == 0:
            osutil.signal_instance(instance.pid, signal.SIGKILL)

    def timeout(self) -> float | None:
        """How long the loop may sleep before :meth:`tick` has something to do."""
        live = self.live()
        if not live:
            return None
        now = self._clock()
        timeout = max(0.0, self._next_shm_scan - now)
        for instance in live:
            if instance.exit_code is not None:
                return SWEEP_INTERVAL  # waiting for its helpers to go
            if instance.stop_deadline is not None:
                timeout = min(timeout, max(0.0, instance.stop_deadline - now))
        return timeout

    def tick(self) -> None:
        """Reap, enforce deadlines, sweep dead groups, and look at segments when due."""
        self._reap()
        now = self._clock()
        for instance in self.live():
            if instance.exit_code is not None:
                if osutil.group_alive(instance.pid):
                    osutil.signal_group(instance.pid, signal.SIGKILL)
                else:
                    self._finish(instance)
            elif instance.stop_deadline is not None and now >= instance.stop_deadline:
                osutil.signal_instance(instance.pid, signal.SIGKILL)
                instance.stop_deadline = now + SWEEP_INTERVAL  # re-check soon, without spinning
        if now >= self._next_shm_scan:
            self._next_shm_scan = now + SHM_SCAN_INTERVAL
            running = [instance for instance in self.live() if instance.exit_code is None]
            if running:
                self._scan_segments(running, now)

    def _scan_segments(self, running: list[Instance], now: float) -> None:
        """Which instance made the segments that appeared in /dev/shm: /proc is read only when one
        that no instance has claimed is due a look (a quiet node costs a scandir a second)."""
        shm = leftovers.listing()
        claimed = {segment for instance in self._instances.values() for segment in instance.shm_segments}
        unclaimed = {(name, inode) for name, inode in shm.items()} - claimed
        # A new one is due at once; one gone (or claimed) is forgotten.
        self._unclaimed = {segment: self._unclaimed.get(segment, now) for segment in unclaimed}
        due = {segment for segment, look_at in self._unclaimed.items() if look_at <= now}
        for segment in due:
            self._unclaimed[segment] = now + SHM_RELOOK_SECONDS
        due = leftovers.owned(due)  # another user's file is never removed: no need to know who maps it
        if not due:
            return
        groups: dict[int, list[int]] | None = None
        for instance in running:
            if due - instance.shm_before:
                groups = groups if groups is not None else leftovers.pids_by_group()
                if instance.remember_segments(groups, shm):
                    self._write_ledger(instance)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            instance = self._by_pid.pop(pid, None)
            if instance is None:
                if self._on_other_exit is None or not self._on_other_exit(pid, status):
                    # An orphaned helper reparented to us (we are a subreaper), or an instance
                    # whose pid is not known yet: kept a while for add().
                    self._unclaimed_exits[pid] = (status, time.monotonic())
                    while len(self._unclaimed_exits) > 256:
                        del self._unclaimed_exits[next(iter(self._unclaimed_exits))]
                continue
            instance.exit_code = osutil.exit_code_from_status(status)
            if instance.remember_segments():  # its helpers may still map them
                self._write_ledger(instance)
            # The main process is gone; whatever it left in its group goes now.
            osutil.signal_group(instance.pid, signal.SIGKILL)

    def _finish(self, instance: Instance) -> None:
        instance.stopped_at = time.time()
        shutil.rmtree(instance.tmpdir, ignore_errors=True)
        # Only what a scan saw it map: a segment it made and left within its last second stays (a rare
        # leak), since another program's file made meanwhile cannot be told from it (never a wrong deletion).
        leftovers.remove_unused(instance.shm_segments)  # never one a live process still uses
        if self._ledger is not None:
            self._ledger.forget(instance.instance_id)
        self._on_finished(instance)

    def _write_ledger(self, instance: Instance) -> None:
        if self._ledger is not None:
            self._ledger.record(instance.instance_id, instance.shm_segments)
