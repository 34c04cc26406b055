"""What each transition of a model's lifecycle does (lifecycle.py names them): start (make room,
create the instance, wait until it is healthy), sleep, wake, stop. Part of
:class:`launcher.frontdoor.door.FrontDoor` (see core.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable

from launcher.frontdoor import room, sleep
from launcher.frontdoor.core import (
    FAILED_LOG_LINES,
    REAP_INTERVAL,
    DoorCore,
    finish_despite_cancel,
    instance_id_for,
    log,
)
from launcher.frontdoor.lifecycle import Phase
from launcher.frontdoor.model_state import (
    InsufficientMemory,
    ModelState,
    NoRoom,
    StartFailed,
    effective_start_timeout,
)
from launcher.frontdoor.profiles import ModelProfile
from launcher.instances import readiness
from launcher.instances.config import VllmConfig
from launcher.instances.failure_reason import failure_reason
from launcher.instances.state import InstanceRecord


class Effects(DoorCore):
    """Starting, sleeping, waking and stopping models' instances, and making room for them."""

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
            deadline = time.monotonic() + timeout  # its create included: the first waits for its weights' load
            wanted = instance_id_for(state.name)
            creating = asyncio.ensure_future(self._create(state, profile, wanted))
            try:
                # Not asyncio.wait_for: on 3.11 it returns a result that came in the step it was
                # cancelled in, and the stop or replace would be lost.
                async with asyncio.timeout(timeout):
                    record = await asyncio.shield(creating)
            except (asyncio.CancelledError, TimeoutError) as exc:
                # Cancelled once or twice (a stop, then a delete) or out of time: a create waiting for
                # its model's weights is taken back; a fork under way is finished and its instance
                # removed below: nothing is left that no one owns.
                self._manager.cancel_create(wanted)
                made = await finish_despite_cancel(creating)
                instance_id = made.instance_id if made is not None else None
                if isinstance(exc, TimeoutError):
                    raise StartFailed(
                        f"model {state.name!r} failed to start: its instance was not "
                        f"{'ready' if made is not None else 'made'} within {timeout:g}s (start_timeout)"
                        + ("" if made is not None else ": its model's weights were still loading")
                    ) from None
                raise
            state.running_profile = profile
            instance_id = state.instance_id = record.instance_id
            try:
                record = await asyncio.wait_for(self._manager.wait_settled(instance_id), deadline - time.monotonic())
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
            state.move(Phase.STOPPED, "no_room")
            state.last_error, state.instance_id = str(exc), None
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
            cause = "replaced" if replaced else "cancelled" if isinstance(exc, asyncio.CancelledError) else "failed"
            final = Phase.STOPPED if replaced else Phase.FAILED
            state.last_error = None if replaced else message
            state.running_profile = None
            self.metrics.starts.labels(model=state.name, outcome="cancelled" if reason else "failed").inc()
            if instance_id is None:
                state.instance_id = None
                state.move(final, cause)
            else:
                # Stopping until its instance is gone (nothing is left behind): a request arriving
                # meanwhile waits, so that the model never holds two instances.
                state.move(Phase.STOPPING, cause)
                self._notify()
                try:
                    await asyncio.shield(self._delete_instance(instance_id))
                finally:
                    state.instance_id = None
                    state.move(final, "gone")
            self._notify()
            log.warning("%s", message)
            if not isinstance(exc, Exception):
                raise  # cancelled: by a stop, delete or replace, or at shutdown
            raise StartFailed(message) from None
        seconds = time.monotonic() - started
        state.move(Phase.READY, "healthy")
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

    async def _create(self, state: ModelState, profile: ModelProfile, instance_id: str) -> InstanceRecord:
        # From here the manager's own reservation holds the slot (taken before its first await).
        self._claims.discard(state.uid)
        config = profile.instance_config(state.name, placed_gpus=state.placed_gpus, sleep=self.sleeps(state, profile))
        return await self._manager.create(config, instance_id, received_at=time.time())

    # ------------------------------------------------------------------ room

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
        by_uid: dict[Hashable, ModelState] = {
            state.uid: state for state in self._states.values()
        }  # only live profiles are evictable
        work = [self._begin_sleep(by_uid[uid], "room") for uid in actions.sleep]
        work += [self._begin_stop(by_uid[uid], "evicted") for uid in actions.stop]
        if work:
            await asyncio.wait(work)

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
        state.move(Phase.SLEEPING, reason)
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
            await self._stop(state, f"{reason}; sleep failed", "sleep_failed")
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
            state.move(Phase.SLEEPING, "no_room")  # still asleep; its waiters get the 503
            state.refusal = exc
            state.last_error = str(exc)
            self._notify()
            raise
        try:
            await sleep.wake(self._http, self._base_url(record), profile.sleep_level)
        except sleep.SleepError as exc:
            log.warning("model %s: could not wake instance %s (%s): starting it afresh", state.name,
                        record.instance_id, exc)  # fmt: skip
            self.metrics.wakes.labels(model=state.name, outcome="failed").inc()
            await self._stop(state, "wake failed", "wake_failed")
            return
        self._manager.mark_asleep(record, False)
        state.move(Phase.READY, "awake")
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
        state.move(Phase.STOPPING, reason)
        task = self._spawn(self._stop(state, reason, "gone"), f"stop-{state.name}")
        state.stop_task = task
        return task

    async def _stop(self, state: ModelState, reason: str, cause: str) -> None:
        """Delete the model's instance; it is then stopped (``cause``: why, for its lifecycle)."""
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
            state.move(Phase.STOPPED, cause)
            state.retire = False
            self._notify()
