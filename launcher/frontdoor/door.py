"""The front door's coordination: a model starts on its first request and stops when idle.

A client of :class:`launcher.instances.manager.InstanceManager`: every instance it starts is an ordinary
instance (in ``/v2/vllm/instances``, the watch stream and the metrics), annotated with the
model's name. Per model it keeps a phase (lifecycle.py), the instance, the requests in flight and
the time of the last one. Everything runs on the event loop, so a check and the change it guards
happen without an ``await`` between them (a request in flight is counted before anything can
decide to stop its instance). The effects of each transition are in effects.py, names and
profile changes in catalog.py, the shared fields in core.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx

from launcher.errors import LauncherError, NotFound, ServiceUnavailable
from launcher.frontdoor.catalog import Catalog
from launcher.frontdoor.compile_ahead import COMPILE_ANNOTATION, CompileAhead
from launcher.frontdoor.core import (
    LOST_WAIT_SECONDS,
    REAP_INTERVAL,
    RECHECK_SECONDS,
    RUNNING_CHECK_SECONDS,
    current_phase,
    log,
    process_running,
)
from launcher.frontdoor.effects import Effects
from launcher.frontdoor.fitting import Fitting
from launcher.frontdoor.footprints import Footprints
from launcher.frontdoor.lifecycle import Phase
from launcher.frontdoor.model_state import (
    InsufficientMemory,
    Lease,
    ModelInvalid,
    ModelState,
    NoRoom,
    StartFailed,
    effective_idle_timeout,
)
from launcher.frontdoor.profiles import MODEL_ANNOTATION, ModelsFile
from launcher.instances.manager import InstanceManager
from launcher.instances.memory import parse_size
from launcher.instances.state import InstanceRecord
from launcher.metrics import FrontDoorMetrics
from launcher.settings import Settings


class FrontDoor(Catalog, Effects):
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
                and self._config_for(state, record).as_requested() == record.config.as_requested()
            )
            if state is not None and takes_it:
                state.move(
                    Phase.SLEEPING if record.asleep else Phase.READY, "adopted"
                )  # asleep: the next request wakes it
                state.instance_id, state.running_profile = record.instance_id, state.profile
                state.last_used, state.compiled = time.time(), True
                if state.profile.gpu_uuids is None:
                    state.placed_gpus = record.config.gpu_uuids
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

    # ------------------------------------------------------------------ profiles at run time

    async def delete_profile(self, name: str) -> None:
        """Remove a profile (new requests get 404 at once), then stop its instance once idle."""
        await self.stop_removed(self.forget_profile(name))

    async def stop_removed(self, state: ModelState) -> None:
        """Stop a removed profile's instance once idle; return when it is gone."""
        try:
            await self.stop_model(state, reason="deleted")
        finally:
            self._removed.remove(state)

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
            state.move(Phase.STOPPED, "replaced")  # its waiters start the new profile
            state.last_error = None
        else:
            state.move(Phase.FAILED, "cancelled")
            state.last_error = f"model {state.name!r}: its start was cancelled ({reason})"
        self._claims.discard(state.uid)
        self._notify()

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
            state.move(Phase.WAKING, "request")  # requests arriving meanwhile share this wake, as a start
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
            outcome = current_phase(state)  # what the start left
            if outcome is Phase.FAILED and state.last_error is not None:
                raise StartFailed(state.last_error)
            refused = state.refusal  # only a refusal is the client's answer: an instance found dead is not
            if outcome in (Phase.STOPPED, Phase.SLEEPING) and refused is not None:
                raise type(refused)(str(refused))
            return  # ready, stopped (a lost instance, a replaced profile): look again, start afresh
        if state.phase in (Phase.STOPPING, Phase.READY):  # stopping, or retiring once idle
            await self._wait_change(REAP_INTERVAL)
            return
        state.move(Phase.STARTING, "request")
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
            if process_running(lease.record.pid):
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

    # ------------------------------------------------------------------ starting

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

    async def _preload(self, state: ModelState) -> None:
        try:
            await self.start_model(state)
        except (StartFailed, NoRoom, NotFound, ModelInvalid) as exc:
            log.warning("could not preload model %s: %s", state.name, exc)

    # ------------------------------------------------------------------ sleeping

    # ------------------------------------------------------------------ stopping

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
