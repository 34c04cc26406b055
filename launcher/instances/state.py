"""An instance's state as the API reports it. Status changes happen only here."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from launcher.instances.config import VllmConfig
from launcher.instances.memory import Footprint


class Status(str, enum.Enum):
    """Exactly the two values of the original document."""

    RUNNING = "running"
    STOPPED = "stopped"


@dataclass
class InstanceRecord:
    """One instance, from create to delete."""

    instance_id: str
    config: VllmConfig
    log_path: str
    pid: int
    port: int
    model: str
    received_at: float  # wall clock when the create request arrived
    created_at: float = field(default_factory=time.time)  # when the fork was done
    host: str | None = None  # the instance's --host, if given
    status: Status = Status.RUNNING
    ready: bool = False
    ready_at: float | None = None
    exit_code: int | None = None
    stopped_at: float | None = None
    stop_reason: str | None = None
    revision: int = 0
    start_phases: dict[str, float] | None = None  # where start_seconds went (forkserver/phases.py)
    memory: Footprint | None = None  # what it holds now, sampled (launcher/instances/memory.py)
    memory_peak: Footprint | None = None  # the most it held
    asleep: bool = False  # put to sleep by the front door (vLLM's sleep mode)
    zygote_pid: int | None = None  # the zygote whose loaded weights it shares (forkserver/zygotes.py)

    @property
    def live(self) -> bool:
        return self.status is Status.RUNNING

    def mark_ready(self, *, at: float | None = None) -> bool:
        """Record the first healthy answer; False if already ready or stopped."""
        if self.ready or self.status is Status.STOPPED:
            return False
        self.ready = True
        self.ready_at = at if at is not None else time.time()
        return True

    def mark_stopped(self, *, exit_code: int | None, stopped_at: float | None, reason: str | None = None) -> bool:
        """Record the end of the instance; False if it was already stopped."""
        if self.status is Status.STOPPED:
            return False
        self.status = Status.STOPPED
        self.exit_code = exit_code
        self.stopped_at = stopped_at if stopped_at is not None else time.time()
        self.stop_reason = reason
        return True

    def to_json(self) -> dict[str, Any]:
        """The state object of the API."""
        state: dict[str, Any] = {
            "status": self.status.value,
            "instance_id": self.instance_id,
            **self.config.echo(),
            "pid": self.pid,
            "port": self.port,
            "model": self.model,
            "created_at": self.created_at,
            "ready": self.ready,
            "ready_at": self.ready_at,
            "start_seconds": None if self.ready_at is None else round(self.ready_at - self.received_at, 3),
            "start_phases": self.start_phases,
            "revision": self.revision,
        }
        if self.memory is not None and self.status is Status.RUNNING:
            state["memory"] = self.memory.to_json()
        if self.asleep and self.status is Status.RUNNING:
            state["sleeping"] = True
        if self.status is Status.STOPPED:
            state["exit_code"] = self.exit_code
            state["stopped_at"] = self.stopped_at
            if self.stop_reason:
                state["stop_reason"] = self.stop_reason
        return state
