"""The front door's bookkeeping: a model starts on its first request and stops when idle.

A client of :class:`launcher.manager.InstanceManager`: every instance it starts is an ordinary
instance (in ``/v2/vllm/instances``, the watch stream and the metrics), annotated with the
model's name. Per model it keeps a phase, the instance, the requests in flight and the time of
the last one. Everything runs on the event loop, so a check and the change it guards happen
without an ``await`` between them (a request in flight is counted before anything can decide to
stop its instance).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Hashable
from typing import Any

import httpx

from launcher import readiness
from launcher.errors import LauncherError, NotFound, ServiceUnavailable
from launcher.failure_reason import failure_reason
from launcher.frontdoor import room, sleep
from launcher.frontdoor.compile_ahead import COMPILE_ANNOTATION, CompileAhead, Compiled, needs_compile
from launcher.frontdoor.fitting import Fitting
from launcher.frontdoor.footprints import Footprints
from launcher.frontdoor.model_state import (
    InsufficientMemory,
    Lease,
    ModelInvalid,
    ModelState,
    NoRoom,
    Phase,
    StartFailed,
    effective_idle_timeout,
    effective_start_timeout,
)
from launcher.frontdoor.profiles import MODEL_ANNOTATION, ModelProfile, ModelsFile, ProfileError, check_name
from launcher.manager import InstanceManager
from launcher.memory import parse_size
from launcher.metrics import FrontDoorMetrics
from launcher.models import VllmConfig
from launcher.settings import Settings
from launcher.state import InstanceRecord

log = logging.getLogger("launcher.front_door")

REAP_INTERVAL = 0.5  # seconds between idle checks; also the longest a waiter sleeps between looks
FAILED_LOG_LINES = 400  # kept of a failed start's log, once its instance is removed
RECHECK_SECONDS = 1.0  # an invalid model asked for is checked again at most this often
LOST_WAIT_SECONDS = 3.0  # how long a request whose instance broke off waits to learn whether it died
RUNNING_CHECK_SECONDS = 0.25  # its process seen running this long: it lives (one dying closes its sockets first)


def _phase(state: ModelState) -> Phase:
    return state.phase


def _log_failure(task: asyncio.Task[Any]) -> None:
    """A background task that died says so (a dead reaper would silently end idle stops)."""
    if task.cancelled():
        return
    error = task.exception()
    # A start's failure reaches its waiters through the model's state; anything else is a bug.
    if error is not None and not isinstance(error, (StartFailed, NoRoom, ModelInvalid)):
        log.error("front-door task %s failed", task.get_name(), exc_info=error)


def _process_running(pid: int | None) -> bool:
    """Whether ``pid`` is a process that has not exited (not a zombie waiting to be reaped)."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _instance_id_for(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")[:100] or "model"
    return f"{slug}-{secrets.token_hex(3)}"


class FrontDoor:
    """Model profiles, their instances, and the decisions about starting and stopping them."""

    def __init__(self, manager: InstanceManager, settings: Settings, models: ModelsFile) -> None:
        self._manager = manager
        self._settings = self.settings = settings
        self.default_idle_timeout = models.idle_timeout
        self._states: dict[str, ModelState] = {}
        self._labels: dict[str, str] = {}  # name or alias -> name
        self._making_room = 0  # starts waiting for room: compile-ahead waits for them
        self.fitting = Fitting(manager, settings, Footprints(settings.resolved_footprints_file()), self.sleeps)
        parse_size(settings.memory_budget), parse_size(settings.gpu_memory_reserve)  # a bad size stops the start
        self._compiler = CompileAhead(
            manager,
            timeout=settings.compile_ahead_timeout,
            on_done=self._compiled,
            serving_waits=lambda: self._making_room > 0,
        )
        # Only vLLM compiles: a stand-in's profiles are compiled ahead only when asked (POST .../warm).
        self._auto_compile = settings.compile_ahead and settings.forkserver_workload == "vllm"
        for name, profile in models.models.items():
            self._add(name, profile)
            self._warn_if_open(name, profile)
        # Models past the room check whose instance is not created yet, by identity: a re-added
        # profile is another model than its deleted namesake, whose start may still hold a claim.
        self._claims: set[int] = set()
        self._started = False  # the models file's profiles are checked and begun (see _check_then_begin)
        self._removed: list[ModelState] = []  # deleted profiles whose instance is still stopping
        self._queued = 0
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.metrics = FrontDoorMetrics(manager.metrics.registry, queue_depth=lambda: self._queued)
        self.metrics.sleeping.set_function(lambda: sum(s.phase is Phase.SLEEPING for s in self._states.values()))
        self.metrics.invalid.set_function(lambda: sum(s.invalid is not None for s in self._states.values()))
        self._http: httpx.AsyncClient | None = None  # for the sleep endpoints; made on the event loop
        self._told_no_sleep: set[str] = set()  # models told once that this platform has no sleep mode
        self._progress: dict[str, tuple[float, str]] = {}  # instance id -> (when, its start phase in words)
        manager.on_adopted(self._adopt)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the idle reaper; once each profile is checked (vLLM's parser, its model folder, its
        memory), the models marked ``preload`` and compiling the others ahead. A profile that
        cannot run is marked invalid: the launcher serves the others."""
        self._http = httpx.AsyncClient(trust_env=False)
        self._spawn(self._reap_forever(), "front-door-reaper")
        self._spawn(self._compiler.run_forever(), "compile-ahead")
        self._spawn(self._check_then_begin(), "check-profiles")

    async def _check_then_begin(self) -> None:
        for state in list(self._states.values()):
            await self.check_runnable(state)
        self._started = True  # from here a model found valid begins at once (check_runnable)
        for state in list(self._states.values()):
            if state.invalid is None and self._states.get(state.name) is state:
                self._begin(state)

    async def check_runnable(self, state: ModelState) -> bool:
        """Check the model's profile as a ``PUT`` does (vLLM's parser in the forkserver, the
        ``--model`` folder) and against the memory budgets; mark it invalid (``state.invalid``,
        its reason) or valid again. True if it can run."""
        profile = state.profile
        problem: str | None = None
        while True:
            try:
                await self._manager.validate(profile.instance_config(state.name))
            except ServiceUnavailable:  # the forkserver is (re)starting: the check waits for it
                await asyncio.sleep(1.0)
                continue
            except LauncherError as exc:
                problem = exc.detail
            break
        if state.profile is not profile or self._states.get(state.name) is not state:
            return problem is None  # replaced or removed meanwhile: its successor is checked on its own
        fit = None if problem is not None else self.fitting.fit_problem(state)
        state.invalid_memory = fit is not None  # answered as insufficient_memory, as a start would be
        problem = problem or fit
        state.checked_at = time.monotonic()
        if problem is not None and state.invalid != problem:
            log.warning("model %s cannot be started: %s", state.name, problem)
        elif problem is None and state.invalid is not None:
            log.info("model %s can be started again", state.name)
        previous, first = state.invalid, not state.checked
        state.invalid, state.checked = problem, True
        self._notify()
        if problem is None and (first or previous is not None) and self._started:
            self._begin(state)  # found valid (added by a reload, or fixed): preloaded or compiled ahead, as at start
        return problem is None

    def _begin(self, state: ModelState) -> None:
        """A model found valid: started now if it says ``preload``, else compiled ahead."""
        if state.profile.preload and state.phase is Phase.STOPPED:
            self._spawn(self._preload(state), f"preload-{state.name}")
        elif self._auto_compile:
            self._compile_ahead(state)

    async def shutdown(self) -> None:
        """Stop the background work (the manager stops the instances)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._http is not None:
            await self._http.aclose()

    def spawn(self, coroutine: Any, name: str) -> asyncio.Task[Any]:
        """Run ``coroutine`` as a background task of the front door (cancelled at shutdown; a failure is logged)."""
        return self._spawn(coroutine, name)

    def _spawn(self, coroutine: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)
        return task

    def _adopt(self, records: list[InstanceRecord]) -> None:
        """Take back the front-door instances a forkserver kept across an API restart.

        One started with its model's current profile, ready and alive, is the model's instance
        again (``ready``; idle stop and eviction apply from now). Anything else the front door
        started is stopped: a throwaway compile, a start that was not finished, an instance whose
        profile changed or is gone, or a second one of a model. So no model has two instances.
        """
        for record in records:
            annotations = record.config.annotations or {}
            name = annotations.get(MODEL_ANNOTATION)
            if name is None:
                continue  # created through /v2/vllm/instances: not the front door's
            state = self._states.get(name)
            takes_it = (
                state is not None
                and COMPILE_ANNOTATION not in annotations
                and record.live
                and record.ready
                and state.phase is Phase.STOPPED
                and state.instance_id is None
                and self._config_for(state, record) == record.config
            )
            if state is not None and takes_it:
                state.phase, state.instance_id, state.running_profile = Phase.READY, record.instance_id, state.profile
                state.last_used, state.compiled = time.time(), True
                if state.profile.gpu_uuids is None:
                    state.placed_gpus = record.config.gpu_uuids
                if record.asleep:
                    state.phase = Phase.SLEEPING  # the next request wakes it
                log.info("model %s: adopted its instance %s", name, record.instance_id)
                continue
            if record.live:
                log.info(
                    "stopping instance %s of model %s: not the instance of its current profile",
                    record.instance_id,
                    name,
                )
            self._spawn(self._delete_instance(record.instance_id), f"remove-{record.instance_id}")
        self._notify()

    # ------------------------------------------------------------------ names

    def resolve(self, label: str) -> ModelState | None:
        """The model a client means by ``label`` (a name or an alias)."""
        name = self._labels.get(label)
        return self._states.get(name) if name is not None else None

    def states(self) -> list[ModelState]:
        """Every model, in the order they were added."""
        return list(self._states.values())

    def labels(self) -> list[tuple[str, ModelState]]:
        """Every name and alias with its model (what ``/v1/models`` lists)."""
        return [(label, self._states[name]) for label, name in self._labels.items()]

    def _add(self, name: str, profile: ModelProfile) -> ModelState:
        state = ModelState(name=name, profile=profile, compiled=not needs_compile(profile))
        self._states[name] = state
        for label in [name, *profile.aliases]:
            self._labels[label] = name
        return state

    def _warn_if_open(self, name: str, profile: ModelProfile) -> None:
        host = profile.host()
        if (
            host is not None
            and host not in ("127.0.0.1", "localhost", "::1")
            and (self._settings.api_token or self._settings.api_token_file)
        ):
            log.warning(
                "model %s: its options set --host %s, so its instance answers on that address without the "
                "launcher's token; leave --host out to keep it on loopback (reached through the front door only)",
                name,
                host or "(all addresses)",
            )

    def check_labels(self, name: str, profile: ModelProfile) -> None:
        """:class:`ProfileError` if the name or an alias is another model's (or no name at all)."""
        check_name(name)
        for label in [name, *profile.aliases]:
            owner = self._labels.get(label)
            if owner is not None and owner != name:
                raise ProfileError(f"model name {label!r} is already used by model {owner!r}")

    # ------------------------------------------------------------------ profiles at run time

    def drop_aliases(self, name: str) -> None:
        """Let go of the model's aliases (a reload gives it its new ones with :meth:`put_profile`)."""
        for label in [label for label, owner in self._labels.items() if owner == name and label != name]:
            del self._labels[label]

    def put_profile(self, name: str, profile: ModelProfile, *, compile_ahead: bool = True) -> tuple[ModelState, bool]:
        """Add or replace a profile; True if it is new. A running instance with another
        configuration is stopped once no request is in flight; the next request starts the new one.
        ``compile_ahead``: compile it ahead now (False: once :meth:`check_runnable` finds it valid)."""
        self.check_labels(name, profile)
        self._warn_if_open(name, profile)
        state = self._states.get(name)
        if state is None:
            state = self._add(name, profile)
            if self._auto_compile and compile_ahead:
                self._compile_ahead(state)
            return state, True
        for label in [name, *state.profile.aliases]:
            if self._labels.get(label) == name:  # an alias another model has taken meanwhile stays its
                del self._labels[label]
        for label in [name, *profile.aliases]:
            self._labels[label] = name
        running = state.running_profile or state.profile
        if profile.instance_config(name) != running.instance_config(name):
            if state.phase is Phase.STARTING:
                self._cancel_start(state, "replaced")  # its waiters start the new profile instead
            elif state.phase in (Phase.READY, Phase.SLEEPING, Phase.WAKING):
                state.retire = True  # the instance would differ: replace it once idle
        changed = profile.instance_config(name) != state.profile.instance_config(name)
        state.profile = profile
        if changed:
            state.invalid, state.checked = None, False  # a new profile: checked afresh by whoever changed it
        if changed:
            state.compiled, state.compile_error = not needs_compile(profile), None
            if self._auto_compile and compile_ahead:
                self._compile_ahead(state)
        self._notify()
        return state, False

    async def delete_profile(self, name: str) -> None:
        """Remove a profile (new requests get 404 at once), then stop its instance once idle."""
        await self.stop_removed(self.forget_profile(name))

    def forget_profile(self, name: str) -> ModelState:
        """Remove a profile now (new requests get 404); its instance stops with :meth:`stop_removed`."""
        state = self._states.pop(name, None)
        if state is None:
            raise NotFound(f"model {name!r} not found")
        for label in [name, *state.profile.aliases]:
            self._labels.pop(label, None)
        self._compiler.forget(name)
        self._removed.append(state)  # its GPUs and slot stay taken until the instance is gone
        self._notify()
        return state

    async def stop_removed(self, state: ModelState) -> None:
        """Stop a removed profile's instance once idle; return when it is gone."""
        try:
            await self.stop_model(state, reason="deleted")
        finally:
            self._removed.remove(state)

    def warm(self, state: ModelState) -> None:
        """Compile the model ahead now (``POST .../warm``), unless it is compiled or has nothing to compile;
        :class:`ModelInvalid` if its profile cannot run (nothing is forked for it)."""
        if state.invalid is not None:
            raise ModelInvalid(f"model {state.name!r} cannot be started: {state.invalid}")
        if state.compiled is True or not needs_compile(state.profile):
            return
        if state.phase in (Phase.STARTING, Phase.READY):
            return  # its real instance compiles (or has compiled) it
        self._compile_ahead(state)

    def _compile_ahead(self, state: ModelState) -> None:
        if needs_compile(state.profile) and state.compiled is not True and state.invalid is None:
            self._compiler.request(state.name, state.profile)

    def _compiled(self, name: str, profile: ModelProfile, compiled: Compiled, error: str | None) -> None:
        state = self._states.get(name)
        if state is None or state.profile != profile:
            return  # deleted or replaced meanwhile: the new profile has a compile of its own
        if compiled is not True and state.compiled is True:
            return  # a real instance of it got its engine up meanwhile
        state.compiled, state.compile_error = compiled, error
        self._notify()

    async def start_model(self, state: ModelState) -> None:
        """Start the model now (as a first request would) and wait until it is ready."""
        self.release(await self.acquire(state))

    async def stop_model(self, state: ModelState, reason: str = "stopped") -> None:
        """Stop the model's instance once no request is in flight; return when it is gone.

        Requests that arrive meanwhile wait, then start it again.
        """
        state.retire = True
        self._notify()
        stop: asyncio.Task[None] | None = None
        try:
            while stop is None:
                if state.phase is Phase.STARTING and state.start_task is not None:
                    self._cancel_start(state, reason)  # a hung start must not block a stop or delete
                    await asyncio.wait({state.start_task})
                elif state.phase is Phase.STOPPING and state.stop_task is not None:
                    stop = state.stop_task
                elif state.phase is Phase.WAKING and state.start_task is not None:
                    await asyncio.wait({state.start_task})
                elif state.phase is Phase.SLEEPING:
                    await self._sleep_done(state)
                    if state.phase is Phase.SLEEPING:
                        stop = self._begin_stop(state, reason)
                elif state.phase is Phase.READY and state.in_flight == 0:
                    stop = self._begin_stop(state, reason)
                elif state.phase is Phase.READY:
                    await self._wait_change(REAP_INTERVAL)
                else:
                    return
            await asyncio.wait({stop})  # done: a request that came meanwhile may start it again
        finally:
            state.retire = False

    def _start_never_ran(self, state: ModelState, task: asyncio.Task[None]) -> None:
        """A start cancelled before its first step runs no handler of its own: settle its phase here."""
        if state.start_task is not task or state.phase is not Phase.STARTING:
            return  # the start set its outcome itself
        reason, state.cancel_reason = state.cancel_reason, None
        if reason == "replaced":
            state.phase, state.last_error = Phase.STOPPED, None  # its waiters start the new profile
        else:
            state.phase, state.last_error = Phase.FAILED, f"model {state.name!r}: its start was cancelled ({reason})"
        self._claims.discard(state.uid)
        self._notify()

    def _cancel_start(self, state: ModelState, reason: str) -> None:
        if state.start_task is not None and not state.start_task.done():
            state.cancel_reason = reason
            state.start_task.cancel()

    # ------------------------------------------------------------------ requests

    async def acquire(self, state: ModelState) -> Lease:
        """Hold the model's instance for one request, starting it first if needed.

        Many requests for a stopped model cause one start; all of them wait for it. At most
        ``--queue-max`` requests wait at once. Raises :class:`StartFailed` or :class:`NoRoom`;
        :class:`NotFound` if the profile is deleted.
        """
        if state.invalid is not None:
            await self._recheck_invalid(state)
        queued = False
        try:
            while True:
                if self._states.get(state.name) is not state:
                    raise NotFound(f"model {state.name!r} was removed")
                if state.phase is Phase.READY and not state.retire:
                    lease = self.try_acquire(state)
                    if lease is not None:
                        return lease
                    self._lost(state)
                    continue
                if not queued:  # from here on the request waits: count it against --queue-max
                    if self._queued >= self._settings.queue_max:
                        raise NoRoom(
                            f"model {state.name!r} is not ready and {self._queued} requests already wait "
                            f"(--queue-max {self._settings.queue_max})"
                        )
                    self._queued += 1
                    queued = True
                await self._wait_or_start(state)
        finally:
            if queued:
                self._queued -= 1

    async def _recheck_invalid(self, state: ModelState) -> None:
        """An invalid model asked for: checked again (a folder may have appeared), at most once a
        second; :class:`ModelInvalid` at once if it still cannot run (no start is tried)."""
        if time.monotonic() - state.checked_at >= RECHECK_SECONDS:
            await self.check_runnable(state)
        if state.invalid is not None and state.invalid_memory:
            raise InsufficientMemory(state.invalid)
        if state.invalid is not None:
            raise ModelInvalid(f"model {state.name!r} cannot be started: {state.invalid}")

    def try_acquire(self, state: ModelState) -> Lease | None:
        """Hold the model's instance for one request if it is ready now (no waiting), else None.

        The proxy's fast path: a ready model's request is leased without a task or an ``await``.
        """
        if state.phase is not Phase.READY or state.retire or self._states.get(state.name) is not state:
            return None
        record = self._live_record(state)
        if record is None:
            return None
        state.in_flight += 1
        state.last_used = time.time()
        return Lease(state, record)

    def keeps_alive(self, state: ModelState) -> bool:
        """Whether a stream waiting for this model's start gets SSE comments meanwhile."""
        wanted = state.profile.start_keepalive
        return self._settings.start_keepalive if wanted is None else wanted

    def start_progress(self, state: ModelState) -> str:
        """Where the model's start is, in a few words (for the keep-alive comments)."""
        if state.phase in (Phase.SLEEPING, Phase.WAKING):
            return "waking from sleep"
        if state.instance_id is None:
            return "waiting for room" if state.phase is Phase.STARTING else "starting"
        try:
            record = self._manager.get(state.instance_id)
        except NotFound:
            return str(state.phase.value)
        # Every waiting stream asks every few seconds: the log is read once a second per instance at most.
        now, known = time.monotonic(), self._progress.get(record.instance_id)
        if known is None or now - known[0] >= 1.0:
            known = self._progress[record.instance_id] = (now, self._manager.start_progress(record))
            if len(self._progress) > 1024:
                self._progress = {record.instance_id: known}
        return known[1]

    async def _wait_or_start(self, state: ModelState) -> None:
        """One step of a request that cannot be served yet: wait for what is under way, or start."""
        if state.phase is Phase.SLEEPING:
            state.phase = Phase.WAKING  # requests arriving meanwhile share this wake, as a start
            state.last_error, state.refusal = None, None
            state.start_task = self._spawn(self._wake(state), f"wake-{state.name}")
            self._notify()
        if state.phase in (Phase.STARTING, Phase.WAKING) and state.start_task is not None:
            # Counted until this request holds its lease (no await between the two), so a model
            # that has just become ready is never taken for idle before its waiters run: on
            # Python 3.12 they are woken a loop step after another model's room check.
            state.waiting += 1
            try:
                await asyncio.wait({state.start_task})
            finally:
                state.waiting -= 1
            if self._states.get(state.name) is not state:
                raise NotFound(f"model {state.name!r} was removed")
            outcome = _phase(state)  # what the start left
            if outcome is Phase.FAILED and state.last_error is not None:
                raise StartFailed(state.last_error)
            refused = state.refusal  # only a refusal is the client's answer: an instance found dead is not
            if outcome in (Phase.STOPPED, Phase.SLEEPING) and refused is not None:
                raise type(refused)(str(refused))
            return  # ready, stopped (a lost instance, a replaced profile): look again, start afresh
        if state.phase in (Phase.STOPPING, Phase.READY):  # stopping, or retiring once idle
            await self._wait_change(REAP_INTERVAL)
            return
        state.phase = Phase.STARTING
        state.room_held = False
        state.last_error, state.refusal = None, None
        state.retire = False  # whatever was retired is gone: this start uses the current profile
        self._compiler.forget(state.name)  # the real instance compiles (or loads) by itself
        task = state.start_task = self._spawn(self._start(state), f"start-{state.name}")
        task.add_done_callback(lambda _: self._start_never_ran(state, task))

    def reported_gone(self, lease: Lease) -> bool:
        """Whether the forkserver has reported the lease's instance gone."""
        try:
            return not self._manager.get(lease.record.instance_id).live
        except NotFound:
            return True

    async def lost_before_answering(self, lease: Lease, within: float = LOST_WAIT_SECONDS) -> bool:
        """Whether the lease's instance has died, after it failed to answer a request: True once the
        forkserver reports it gone (within ``within`` seconds), and the model forgets the instance, so
        that the next :meth:`acquire` starts it afresh; the caller still holds (and releases) the
        lease. False if its process is seen running, not exiting, for a while: it lives."""
        deadline = time.monotonic() + within
        running_since: float | None = None
        while True:
            try:
                gone = not self._manager.get(lease.record.instance_id).live
            except NotFound:
                gone = True
            if gone:  # only the forkserver's report says so: a pid of another namespace is never taken for dead
                if lease.state.instance_id == lease.record.instance_id and lease.state.phase is Phase.READY:
                    self._lost(lease.state)
                    self._notify()
                return True
            now = time.monotonic()
            if _process_running(lease.record.pid):
                running_since = running_since or now
                if now - running_since >= RUNNING_CHECK_SECONDS:
                    return False  # alive: it closed a connection without answering, but lives
            else:
                running_since = None  # exiting (a zombie), or not to be seen from here: wait for the report
            if now >= deadline:
                return False
            await asyncio.sleep(0.05)  # the forkserver reports an exit once its whole group is gone

    def release(self, lease: Lease) -> None:
        """The request holding ``lease`` is over (answered, failed or cut off by the client)."""
        lease.state.in_flight -= 1
        lease.state.last_used = time.time()
        self._notify()

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
        state.phase = Phase.STOPPED
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

    # ------------------------------------------------------------------ starting

    async def _start(self, state: ModelState) -> None:
        """Make room, create the instance, wait until it is healthy. Sets the phase at the end.

        The wait for healthy ends at the profile's ``start_timeout`` (a hung start fails like any
        failed start); stop, delete and replace cancel it (:meth:`_cancel_start`).
        """
        started = time.monotonic()
        instance_id: str | None = None
        profile = state.profile  # one profile for the whole start: room is made for what is created
        timeout = effective_start_timeout(profile, self._settings.start_timeout)
        try:
            await self._make_room(state, profile, started + self._settings.queue_timeout)
            creating = asyncio.ensure_future(self._create(state, profile))
            try:
                record = await asyncio.shield(creating)  # a fork under way is finished, then removed
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    instance_id = (await creating).instance_id
                raise
            state.running_profile = profile
            instance_id = state.instance_id = record.instance_id
            try:
                record = await asyncio.wait_for(self._manager.wait_settled(instance_id), timeout)
            except TimeoutError:
                raise StartFailed(
                    f"model {state.name!r} failed to start: its instance {instance_id} was not ready within "
                    f"{timeout:g}s (start_timeout); its log ends with: {self._last_log_line(state, record, hung=True)}"
                ) from None
            if not record.ready:
                # One line here; the whole end of the log at GET /v2/vllm/models/<name>/log.
                raise StartFailed(
                    f"model {state.name!r} failed to start: its instance {instance_id} exited with code "
                    f"{record.exit_code} before it was ready: {self._last_log_line(state, record)}"
                )
        except NoRoom as exc:
            state.phase, state.last_error, state.instance_id = Phase.STOPPED, str(exc), None
            state.refusal, state.placed_gpus = exc, None
            self.metrics.starts.labels(model=state.name, outcome="no_room").inc()
            self._notify()
            raise
        except BaseException as exc:
            self._claims.discard(state.uid)
            reason, state.cancel_reason = state.cancel_reason, None
            if isinstance(exc, StartFailed):
                message: str | None = str(exc)
            elif isinstance(exc, asyncio.CancelledError) and reason is not None:
                message = f"model {state.name!r}: its start was cancelled ({reason})"
            else:
                message = f"model {state.name!r} could not be started: {exc}"
            # A replaced profile's waiters start the new one: for them this start never happened.
            replaced = isinstance(exc, asyncio.CancelledError) and reason == "replaced"
            state.phase = Phase.STOPPED if replaced else Phase.FAILED
            state.last_error, state.instance_id = (None if replaced else message), None
            state.running_profile = None
            self.metrics.starts.labels(model=state.name, outcome="cancelled" if reason else "failed").inc()
            self._notify()
            if instance_id is not None:
                await asyncio.shield(self._delete_instance(instance_id))  # nothing is left behind
            log.warning("%s", message)
            if not isinstance(exc, Exception):
                raise  # cancelled: by a stop, delete or replace, or at shutdown
            raise StartFailed(message) from None
        seconds = time.monotonic() - started
        state.phase = Phase.READY
        state.last_used = time.time()
        if state.profile is profile:
            state.compiled, state.compile_error = True, None  # its engine is up: the artifact is cached
        self.metrics.starts.labels(model=state.name, outcome="ready").inc()
        self.metrics.start_seconds.labels(model=state.name).observe(seconds)
        log.info("model %s ready on instance %s in %.2fs", state.name, instance_id, seconds)
        self._notify()

    def _last_log_line(self, state: ModelState, record: InstanceRecord, *, hung: bool = False) -> str:
        """Keep the end of a failed start's log for the model's log endpoint; its one telling line
        (the root cause of a failure, the last line of a start that hung)."""
        state.failed_log = tail = self._manager.log_tail(record, lines=FAILED_LOG_LINES)
        if hung:
            reason = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), None)
        else:
            reason = record.stop_reason or failure_reason(tail)
        return f"{reason or '(its log is empty)'} (the end of its log: GET /v2/vllm/models/{state.name}/log)"

    async def _create(self, state: ModelState, profile: ModelProfile) -> InstanceRecord:
        # From here the manager's own reservation holds the slot (taken before its first await).
        self._claims.discard(state.uid)
        config = profile.instance_config(state.name, placed_gpus=state.placed_gpus, sleep=self.sleeps(state, profile))
        return await self._manager.create(config, _instance_id_for(state.name), received_at=time.time())

    # ------------------------------------------------------------------ memory and placement

    def describe(self, state: ModelState) -> dict[str, Any]:
        """The model as ``/v2/vllm/models`` shows it: profile, state, expected memory and fit."""
        problem = self.fitting.fit_problem(state)
        return {
            **state.to_json(self.default_idle_timeout),
            "memory_estimate": self.fitting.expected(state).to_json(),
            "fits": problem is None,
            **({"fit_problem": problem} if problem else {}),
        }

    def _holders(self, exclude: ModelState) -> list[room.Holder]:
        """Every model holding room but ``exclude`` (a deleted namesake still stopping counts: it is
        another model, told apart by its ``uid``)."""
        every = [*self._states.values(), *self._removed]
        candidates = [(state, self._live_record(state), state in self._removed) for state in every
                      if state is not exclude and not self._waiting_for_room(state)]  # fmt: skip
        # What the models hold, and the front-door instances none holds any more but that still live.
        owned = {state.instance_id for state in every if state.instance_id is not None}
        return self.fitting.holders(candidates) + self.fitting.unowned_holders(owned)

    def _waiting_for_room(self, state: ModelState) -> bool:
        """A start that has neither claimed room nor an instance holds nothing yet: two such starts
        for one GPU must not each wait for the other."""
        return state.phase is Phase.STARTING and not state.room_held

    async def _make_room(self, state: ModelState, profile: ModelProfile, deadline: float) -> None:
        """Wait until ``profile`` fits (evicting idle front-door instances), then claim its slot."""
        problem = self.fitting.fit_problem(state) if profile is state.profile else None
        if problem is not None:
            raise InsufficientMemory(problem)  # nothing is started or stopped for it
        self._making_room += 1
        try:
            await self._make_room_for(state, profile, deadline)
        finally:
            self._making_room -= 1

    async def _make_room_for(self, state: ModelState, profile: ModelProfile, deadline: float) -> None:
        while True:
            live = self._manager.live_count() + len(self._claims)
            actions = self.fitting.plan(state, profile, self._holders(exclude=state), live)
            if actions is not None:
                self._claims.add(state.uid)
                state.room_held = True  # from here it holds its GPUs and memory: its instance is on its way
                await self._carry_out(actions)
                return
            compiling = self._compiler.yield_room()  # serving comes first: look again once it is gone
            if compiling is not None:
                await asyncio.wait({compiling})
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoRoom(
                    f"no room to start model {state.name!r} within {self._settings.queue_timeout:g}s: "
                    "every instance that could make room is busy or not evictable"
                )
            await self._wait_change(min(remaining, REAP_INTERVAL))

    async def _carry_out(self, actions: room.Actions) -> None:
        """Put to sleep and stop what a room plan says (all at once); return when it is done."""
        by_uid: dict[Hashable, ModelState] = {state.uid: state for state in self._states.values()}  # only live profiles are evictable
        work = [self._begin_sleep(by_uid[uid], "room") for uid in actions.sleep]
        work += [self._begin_stop(by_uid[uid], "evicted") for uid in actions.stop]
        if work:
            await asyncio.wait(work)

    async def _preload(self, state: ModelState) -> None:
        try:
            await self.start_model(state)
        except (StartFailed, NoRoom, NotFound, ModelInvalid) as exc:
            log.warning("could not preload model %s: %s", state.name, exc)

    # ------------------------------------------------------------------ sleeping

    def sleeps(self, state: ModelState, profile: ModelProfile | None = None) -> bool:
        """Whether the model's instance sleeps when idle (``idle: sleep`` on a platform with sleep mode).

        On one without (vLLM on CPU) it is stopped instead, as if it said ``idle: stop``: said once.
        """
        profile = profile or state.running_profile or state.profile
        if profile.idle != "sleep":
            return False
        if self._manager.sleep_mode_available:
            return True
        if state.name not in self._told_no_sleep:
            self._told_no_sleep.add(state.name)
            log.warning("model %s: idle: sleep, but instances here have no sleep mode (vLLM on CPU): "
                        "it is stopped when idle instead", state.name)  # fmt: skip
        return False

    def _base_url(self, record: InstanceRecord) -> str:
        return f"http://{readiness.probe_host(record.host)}:{record.port}"

    def _config_for(self, state: ModelState, record: InstanceRecord) -> VllmConfig:
        """The instance the model's current profile would start, on the GPUs ``record`` has."""
        placed = record.config.gpu_uuids if state.profile.gpu_uuids is None else None
        return state.profile.instance_config(state.name, placed_gpus=placed, sleep=self.sleeps(state, state.profile))

    def _begin_sleep(self, state: ModelState, reason: str) -> asyncio.Task[None]:
        """Put the model's instance to sleep (no request may be in flight); the task ends once it is."""
        assert state.in_flight == 0, "an instance with a request in flight is never put to sleep"
        state.phase = Phase.SLEEPING
        task = state.sleep_task = self._spawn(self._sleep(state, reason), f"sleep-{state.name}")
        self._notify()
        return task

    async def _sleep(self, state: ModelState, reason: str) -> None:
        record = self._live_record(state)
        profile = state.running_profile or state.profile
        if record is None or self._http is None:
            return  # the reaper sees it gone
        try:
            await sleep.put_to_sleep(self._http, self._base_url(record), profile.sleep_level)
        except sleep.SleepError as exc:
            log.warning("model %s: could not put it to sleep (%s): stopping it instead", state.name, exc)
            await self._stop(state, f"{reason}; sleep failed")
            return
        self._manager.mark_asleep(record, True)
        self.metrics.sleeps.labels(model=state.name, reason=reason).inc()
        log.info("model %s: instance %s asleep at level %d (%s)", state.name, record.instance_id,
                 profile.sleep_level, reason)  # fmt: skip

    async def _make_room_to_wake(self, state: ModelState, record: InstanceRecord, deadline: float) -> None:
        """A waking instance takes its GPU memory back: make room for it there first, as for a start."""
        while True:
            live = self._manager.live_count() + len(self._claims)
            actions = self.fitting.plan_wake(state, record, self._holders(exclude=state), live)
            if actions is not None:
                await self._carry_out(actions)
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoRoom(f"no room to wake model {state.name!r} within {self._settings.queue_timeout:g}s: "
                             "every instance that could make room is busy")  # fmt: skip
            await self._wait_change(min(remaining, REAP_INTERVAL))

    async def _sleep_done(self, state: ModelState) -> None:
        if state.sleep_task is not None and not state.sleep_settled():
            await asyncio.wait({state.sleep_task})

    async def _wake(self, state: ModelState) -> None:
        """Wake the sleeping instance for the requests waiting; if it cannot be woken, stop it
        (the requests then start it afresh: a failed wake is never an error to a client)."""
        started = time.monotonic()
        await self._sleep_done(state)
        if state.phase is not Phase.WAKING:
            return  # the sleep failed and stopped it: the waiters start it
        record = self._live_record(state)
        profile = state.running_profile or state.profile
        if record is None or self._http is None:
            self._lost(state)
            return
        try:
            await self._make_room_to_wake(state, record, time.monotonic() + self._settings.queue_timeout)
        except NoRoom as exc:
            state.phase, state.refusal = Phase.SLEEPING, exc  # still asleep; its waiters get the 503
            state.last_error = str(exc)
            self._notify()
            raise
        try:
            await sleep.wake(self._http, self._base_url(record), profile.sleep_level)
        except sleep.SleepError as exc:
            log.warning("model %s: could not wake instance %s (%s): starting it afresh", state.name,
                        record.instance_id, exc)  # fmt: skip
            self.metrics.wakes.labels(model=state.name, outcome="failed").inc()
            await self._stop(state, "wake failed")
            return
        self._manager.mark_asleep(record, False)
        state.phase = Phase.READY
        state.last_used = time.time()
        seconds = time.monotonic() - started
        self.metrics.wakes.labels(model=state.name, outcome="ok").inc()
        self.metrics.wake_seconds.labels(model=state.name).observe(seconds)
        log.info("model %s: instance %s awake in %.2fs", state.name, record.instance_id, seconds)
        self._notify()

    # ------------------------------------------------------------------ stopping

    def _begin_stop(self, state: ModelState, reason: str) -> asyncio.Task[None]:
        """Stop the model's instance (no request may be in flight); the task ends when it is gone."""
        assert state.in_flight == 0, "an instance with a request in flight is never stopped"
        state.phase = Phase.STOPPING
        task = self._spawn(self._stop(state, reason), f"stop-{state.name}")
        state.stop_task = task
        return task

    async def _stop(self, state: ModelState, reason: str) -> None:
        instance_id = state.instance_id
        try:
            if instance_id is not None:
                await self._delete_instance(instance_id)
            if reason == "evicted":
                self.metrics.evictions.labels(model=state.name).inc()
            elif reason == "idle":
                self.metrics.idle_stops.labels(model=state.name).inc()
            log.info("model %s: instance %s stopped (%s)", state.name, instance_id, reason)
        finally:
            state.instance_id = None
            state.running_profile = None
            state.phase = Phase.STOPPED
            state.retire = False
            self._notify()

    async def _delete_instance(self, instance_id: str) -> None:
        try:
            await self._manager.delete(instance_id)
        except NotFound:
            pass
        except Exception as exc:  # noqa: BLE001 - the forkserver may be gone; its instances are gone with it
            log.warning("could not delete instance %s: %s", instance_id, exc)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            self.reap(time.time())
            self.fitting.remember_peaks(
                (state, record) for state in self._states.values() if (record := self._live_record(state)) is not None
            )

    def reap(self, now: float) -> None:
        """Stop idle and retired instances; notice instances that died."""
        for state in self._states.values():
            if state.phase is Phase.SLEEPING and state.sleep_settled():
                if self._live_record(state) is None:
                    self._lost(state)
                    self._notify()
                elif state.retire and not state.waiting:
                    self._begin_stop(state, "replaced")
                continue
            if state.phase is not Phase.READY:
                continue
            if self._live_record(state) is None:
                self._lost(state)
                self._notify()
                continue
            if state.in_flight or state.waiting:
                continue
            idle_timeout = effective_idle_timeout(state.profile, self.default_idle_timeout)
            if state.retire:
                self._begin_stop(state, "replaced")
            elif idle_timeout > 0 and now - (state.last_used or now) >= idle_timeout:
                if self.sleeps(state):
                    self._begin_sleep(state, "idle")
                else:
                    self._begin_stop(state, "idle")

    # ------------------------------------------------------------------ waiting

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, timeout: float) -> None:
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)
