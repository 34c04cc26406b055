"""What the front door keeps per model: its phase, its instance, its requests; and the errors a
request for it can end in.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

from launcher.frontdoor import lifecycle
from launcher.frontdoor.compile_ahead import Compiled
from launcher.frontdoor.lifecycle import Phase, Transition
from launcher.frontdoor.profiles import ModelProfile
from launcher.instances.state import InstanceRecord

_UIDS = itertools.count(1)


class StartFailed(Exception):
    """The model's instance could not be started; the message says why (and shows its log)."""


class NoRoom(Exception):
    """No room could be made within the queue timeout (or the queue is full)."""


class ModelInvalid(Exception):
    """The model's profile cannot run (its folder is missing, vLLM rejects its options, it never
    fits): answered at once, no start is tried."""


class InsufficientMemory(NoRoom):
    """The model's expected footprint exceeds a memory budget even on an empty node."""


@dataclass
class ModelState:
    """One model profile and what the front door knows about its instance."""

    name: str
    profile: ModelProfile
    _phase: Phase = field(default=Phase.STOPPED, repr=False)  # changed only by move()
    instance_id: str | None = None
    in_flight: int = 0
    waiting: int = 0  # requests waiting for its start: it is not idle until they hold their leases
    last_used: float | None = None  # wall clock of the last request's end (or start)
    last_error: str | None = None
    retire: bool = False  # replaced or deleted: stop the instance once no request is in flight
    running_profile: ModelProfile | None = None  # the profile its instance was started with
    start_task: asyncio.Task[None] | None = field(default=None, repr=False)
    stop_task: asyncio.Task[None] | None = field(default=None, repr=False)
    sleep_task: asyncio.Task[None] | None = field(default=None, repr=False)
    cancel_reason: str | None = None  # why its start is being cancelled (stop, delete, replace)
    compiled: Compiled = False  # see launcher/frontdoor/compile_ahead.py
    compile_error: str | None = None
    failed_log: str | None = field(default=None, repr=False)  # the end of the last failed start's log
    placed_gpus: list[str] | None = None  # the GPUs chosen for a profile that names none
    refusal: NoRoom | None = field(default=None, repr=False)  # why its last start or wake found no room
    # Its identity in room plans: a profile deleted and added again under the same name is a new
    # state, while the old one may still hold its GPUs and memory until its instance is gone.
    uid: int = field(default_factory=lambda: next(_UIDS))
    invalid: str | None = None  # why its profile cannot run (state "invalid"); None: it can, as far as known
    checked_at: float = 0.0  # monotonic time of the last check of its profile
    checked: bool = False  # its profile has been checked once
    invalid_memory: bool = False  # invalid because it can never fit the memory budgets
    room_held: bool = False  # starting: past its room check (until then it holds nothing)

    @property
    def phase(self) -> Phase:
        """Where the model is (see launcher/frontdoor/lifecycle.py)."""
        return self._phase

    def move(self, target: Phase, cause: str) -> Transition | None:
        """Change phase: the one place it changes, each change checked against the lifecycle's table."""
        found = lifecycle.transition(self._phase, target, cause, self.name)
        self._phase = target
        return found

    def sleep_settled(self) -> bool:
        """No sleep of its instance is under way (it is asleep, or awake, not between)."""
        return self.sleep_task is None or self.sleep_task.done()

    def shown_state(self) -> str:
        """Its phase in words; ``invalid`` for a profile that cannot run and has no instance."""
        if self.invalid is not None and self.phase in (Phase.STOPPED, Phase.FAILED):
            return "invalid"
        return self.phase.value

    def to_json(self, default_idle_timeout: float) -> dict[str, Any]:
        """The model's profile and state, as ``/v2/vllm/models`` shows it."""
        return {
            "name": self.name,
            **self.profile.model_dump(exclude_none=True),
            "idle_timeout": effective_idle_timeout(self.profile, default_idle_timeout),
            "state": self.shown_state(),
            "instance_id": self.instance_id,
            "last_used": self.last_used,
            "in_flight": self.in_flight,
            "last_error": self.invalid if self.invalid is not None else self.last_error,
            "compiled": self.compiled,
            "compile_error": self.compile_error,
        }


@dataclass(frozen=True)
class Lease:
    """A request's hold on a ready instance; give it back with :meth:`FrontDoor.release`."""

    state: ModelState
    record: InstanceRecord


def effective_idle_timeout(profile: ModelProfile, default: float) -> float:
    """The profile's idle timeout, or the file's default."""
    return profile.idle_timeout if profile.idle_timeout is not None else default


def effective_start_timeout(profile: ModelProfile, default: float) -> float:
    """The profile's start deadline, or the launcher's ``--start-timeout``."""
    return profile.start_timeout if profile.start_timeout is not None else default
