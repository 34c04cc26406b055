"""What the front door's parts share: its fields, its background tasks, waiting for a change, and
forgetting an instance that is gone.

The front door is one object, :class:`launcher.frontdoor.door.FrontDoor`, written in four modules
of one job each: this core; ``catalog.py`` (names, aliases and profiles at run time);
``effects.py`` (what each lifecycle transition does: start, sleep, wake, stop, make room); and
``door.py`` (coordination: requests, leases, the idle reaper, adoption). A model's phases and the
transitions allowed between them are in ``lifecycle.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from typing import Any, TypeVar

import httpx

from launcher.errors import NotFound
from launcher.frontdoor.compile_ahead import CompileAhead
from launcher.frontdoor.fitting import Fitting
from launcher.frontdoor.lifecycle import Phase
from launcher.frontdoor.model_state import (
    ModelInvalid,
    ModelState,
    NoRoom,
    StartFailed,
)
from launcher.instances.manager import InstanceManager
from launcher.instances.state import InstanceRecord
from launcher.metrics import FrontDoorMetrics
from launcher.settings import Settings

log = logging.getLogger("launcher.front_door")

REAP_INTERVAL = 0.5  # seconds between idle checks; also the longest a waiter sleeps between looks
FAILED_LOG_LINES = 400  # kept of a failed start's log, once its instance is removed
RECHECK_SECONDS = 1.0  # an invalid model asked for is checked again at most this often
LOST_WAIT_SECONDS = 3.0  # how long a request whose instance broke off waits to learn whether it died
RUNNING_CHECK_SECONDS = 0.25  # its process seen running this long: it lives (one dying closes its sockets first)


def current_phase(state: ModelState) -> Phase:
    return state.phase


def log_failure(task: asyncio.Task[Any]) -> None:
    """A background task that died says so (a dead reaper would silently end idle stops)."""
    if task.cancelled():
        return
    error = task.exception()
    # A start's failure reaches its waiters through the model's state; anything else is a bug.
    if error is not None and not isinstance(error, (StartFailed, NoRoom, ModelInvalid)):
        log.error("front-door task %s failed", task.get_name(), exc_info=error)


def process_running(pid: int | None) -> bool:
    """Whether ``pid`` is a process that has not exited (not a zombie waiting to be reaped)."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def instance_id_for(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")[:100] or "model"
    return f"{slug}-{secrets.token_hex(3)}"


T = TypeVar("T")


async def finish_despite_cancel(future: asyncio.Future[T]) -> T | None:
    """Wait until ``future`` is done, however often the waiting task is cancelled meanwhile (the
    future itself is shielded); its result, or None if it failed."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.shield(future)
    return None if future.cancelled() or future.exception() is not None else future.result()


class DoorCore:
    """The fields and helpers every part of the front door uses."""

    # Set by FrontDoor.__init__; shared by the door's parts (catalog.py, effects.py, door.py).
    _manager: InstanceManager
    _settings: Settings
    settings: Settings
    default_idle_timeout: float
    _states: dict[str, ModelState]  # name -> model
    _labels: dict[str, str]  # name or alias -> name
    _making_room: int  # starts waiting for room: compile-ahead waits for them
    fitting: Fitting
    _compiler: CompileAhead
    _auto_compile: bool
    # Models past the room check whose instance is not created yet, by identity: a re-added
    # profile is another model than its deleted namesake, whose start may still hold a claim.
    _claims: set[int]
    _started: bool  # the models file's profiles are checked and begun (see FrontDoor._check_then_begin)
    _removed: list[ModelState]  # deleted profiles whose instance is still stopping
    _queued: int
    _changed: asyncio.Event
    _tasks: set[asyncio.Task[Any]]
    metrics: FrontDoorMetrics
    _http: httpx.AsyncClient | None  # for the sleep endpoints; made on the event loop
    _told_no_sleep: set[str]  # models told once that this platform has no sleep mode
    _progress: dict[str, tuple[float, str]]  # instance id -> (when, its start phase in words)

    def spawn(self, coroutine: Any, name: str) -> asyncio.Task[Any]:
        """Run ``coroutine`` as a background task of the front door (cancelled at shutdown; a failure is logged)."""
        return self._spawn(coroutine, name)

    def _spawn(self, coroutine: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(log_failure)
        return task

    def _live_record(self, state: ModelState) -> InstanceRecord | None:
        if state.instance_id is None:
            return None
        try:
            record = self._manager.get(state.instance_id)
        except NotFound:
            return None  # deleted through /v2/vllm/instances
        return record if record.live else None

    def _lost(self, state: ModelState) -> None:
        """The ready instance died or was deleted by someone else: forget it, remove what is left."""
        instance_id = state.instance_id
        state.instance_id = None
        state.running_profile = None
        state.move(Phase.STOPPED, "lost")
        state.refusal = None  # the next request starts it afresh: a dead instance is never a refusal
        if instance_id is None:
            return
        try:
            record = self._manager.get(instance_id)
        except NotFound:
            return
        why = f": {record.stop_reason}" if record.stop_reason else ""
        state.last_error = f"its instance {instance_id} exited with code {record.exit_code}{why}"
        log.warning("model %s: %s", state.name, state.last_error)
        self._spawn(self._delete_instance(instance_id), f"remove-{instance_id}")

    async def _delete_instance(self, instance_id: str) -> None:
        try:
            await self._manager.delete(instance_id)
        except NotFound:
            pass
        except Exception as exc:  # noqa: BLE001 - the forkserver may be gone; its instances are gone with it
            log.warning("could not delete instance %s: %s", instance_id, exc)

    def _cancel_start(self, state: ModelState, reason: str) -> None:
        if state.start_task is not None and not state.start_task.done():
            state.cancel_reason = reason
            state.start_task.cancel()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, timeout: float) -> None:
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)
