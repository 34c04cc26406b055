"""Instance lifecycle: create, probe, stop, delete and list, on top of the forkserver.

Everything here runs on the event loop, so a check and the change it guards happen without
an ``await`` between them (ids, ports and the instance limit are reserved that way).

Why this module is long: the manager is the one owner of instance records, and every change to
one (create, ready, stopped, adopted after an API restart, deleted) happens here, next to the
checks that guard it; its helpers (state, events, readiness, ports, GPUs, memory, stop reasons)
are modules of their own in this package.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from forkserver import phases, protocol
from launcher.errors import (
    BadRequest,
    Conflict,
    InternalError,
    LauncherError,
    NotFound,
    ServiceUnavailable,
    TooManyInstances,
)
from launcher.instances import dir_lock, events, gpus, memory, ports, readiness, sweep
from launcher.instances.config import VllmConfig, check_instance_id, validate_config
from launcher.instances.events import EventLog
from launcher.instances.failure_reason import TAIL_BYTES, read_failure_reason
from launcher.instances.memory import Footprint
from launcher.instances.state import InstanceRecord
from launcher.metrics import LauncherMetrics, StateSnapshot, count_instances, exit_kind
from launcher.settings import Settings
from launcher.supervisor.client import ForkserverClient, ForkserverError, ForkserverGone
from launcher.supervisor.process import ForkserverSupervisor

log = logging.getLogger("launcher.instances.manager")

# What an unstartable instance says of why: whole messages of vLLM's parser, without options of 500 KB.
UNSTARTABLE_REASON_CHARS = 2000


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists (and is not a zombie awaiting its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


PHASE_LOG_BYTES = 4 << 20  # where an instance's start-phase markers are looked for
ALL_ADDRESSES = ("0.0.0.0", "::", "", "[::]")  # a launcher host that means every address
MEMORY_SAMPLE_SECONDS = memory.FAST_SAMPLE_SECONDS  # how often the sampler looks (memory.SampleSchedule says what to read)
MOCK_ASLEEP_GPU_BYTES = 2**30  # what a sleeping instance keeps of a mock GPU (a CUDA context)


class TakenBack(Conflict):
    """A create a DELETE (or a front-door stop) took back before its instance was forked."""


_FAILURE_REASONS: dict[type[LauncherError], str] = {
    BadRequest: "invalid",
    Conflict: "conflict",
    TakenBack: "cancelled",
    TooManyInstances: "limit",
    ServiceUnavailable: "forkserver_unavailable",
    InternalError: "internal",
}


# The latest start marker (forkserver/phases.py), in words.
_PROGRESS = {
    "child_ready": "loading the model",
    "compile_start": "compiling",
    "compile_done": "loading the model",
    "graphs_start": "capturing CUDA graphs",
    "graphs_done": "warming up",
    "engine_ready": "warming up",
}


def _http_error(exc: ForkserverError) -> LauncherError:
    if isinstance(exc, ForkserverGone):
        return ServiceUnavailable(str(exc))
    if exc.kind == protocol.KIND_INVALID:
        return BadRequest(str(exc))
    if exc.kind == protocol.KIND_CONFLICT:
        return Conflict(str(exc))
    if exc.kind == protocol.KIND_NOT_FOUND:
        return NotFound(str(exc))
    return InternalError(f"failed to create vLLM instance: {exc}")


@dataclass
class _Reservation:
    """An id (and later a port) held by a create that has not finished yet."""

    instance_id: str
    config: VllmConfig
    port: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)  # the create has finished, either way
    spawning: bool = False  # its spawn request is sent (or about to be): a cancel must follow it
    cancelled: bool = False  # a delete asked to take it back
    taken_back: bool = False  # and it was: never forked (not a create that failed for its own reason)
    cancelling: asyncio.Task[None] | None = None  # the forkserver's answer to that ask


@dataclass
class _Runtime:
    """Per-instance asyncio objects that do not belong in the reported state."""

    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    probe: asyncio.Task[None] | None = None
    deleting: bool = False


class InstanceManager:
    """The launcher's instances. All state changes go through here, on the event loop."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.log_dir = settings.resolved_log_dir()
        os.makedirs(self.log_dir, mode=0o700, exist_ok=True)
        self.events = EventLog(window=settings.watch_window)
        self.gpus = gpus.configured_gpus(
            mock=settings.mock_gpus,
            count=settings.mock_gpu_count,
            gpu_map=settings.gpu_map,
            node_name=settings.node_name,
        )
        self._records: dict[str, InstanceRecord] = {}
        self._runtime: dict[str, _Runtime] = {}
        self._reserved: dict[str, _Reservation] = {}
        self._deleting: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._early_exits: dict[str, dict[str, Any]] = {}
        # Instances another client (an API before this one) had asked for, forked after it went:
        self._forked_while_reserved: dict[str, dict[str, Any]] = {}  # ... while our own create of that id ran
        self._adopted_since_hello: set[str] = set()  # ... adopted from their event, newer than a hello in flight
        self.metrics = LauncherMetrics()
        self._sampler: asyncio.Task[None] | None = None
        self._schedule = memory.SampleSchedule()
        self.metrics.attach(self._metrics_snapshot)
        self._http: httpx.AsyncClient | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._adoption_listeners: list[Callable[[list[InstanceRecord]], None]] = []
        self.forkserver = ForkserverSupervisor(
            settings, on_event=self._on_event, on_lost=self._on_forkserver_lost, on_connected=self._adopt
        )

    # ------------------------------------------------------------------ lifecycle of the manager

    def start(self) -> None:
        """Clean up after a killed predecessor, then start the forkserver (in the background)."""
        dir_lock.lock(self.log_dir)  # before any sweep: a live launcher's logs are never touched
        if not self.forkserver.external:
            # An external forkserver's instances are alive and their logs are theirs: leave them.
            sweep.sweep(self.log_dir)
            sweep.mark_runtime_dir(self.forkserver.runtime_dir)
        self._http = httpx.AsyncClient(trust_env=False)
        self.forkserver.start()
        self._sampler = asyncio.create_task(self._sample_memory_forever(), name="memory-sampler")

    async def shutdown(self) -> None:
        """End watch streams, stop every instance and the forkserver, remove the log files.

        Instances of an external forkserver keep running (with their logs) for the next API.
        """
        self.events.close()
        if self._sampler is not None:
            self._sampler.cancel()
        for runtime in self._runtime.values():
            if runtime.probe is not None:
                runtime.probe.cancel()
        live = [record for record in self._records.values() if record.live]
        starting = [record for record in live if not record.ready]
        if live and not self.forkserver.external:
            log.info("shutting down: stopping %d instance(s)%s", len(live),
                     f"; {len(starting)} still starting, given {self._settings.stop_timeout_starting:g}s"
                     if starting else "")  # fmt: skip
            # vLLM can hang on SIGTERM while it starts: those get the short deadline, as a DELETE gives them.
            await asyncio.gather(*(self._stop_starting(record) for record in starting))
        await self.forkserver.stop(self._settings.stop_timeout)
        if not self.forkserver.external:
            for record in self._records.values():
                self._remove_log(record.log_path)
        self._records.clear()
        # The default <tmp>/vllm-launcher-<uid>/<port>/logs goes once empty; a --log-dir given stays.
        default = not self._settings.log_dir and not self.forkserver.external
        dir_lock.release(self.log_dir, remove_empty=[self.log_dir, os.path.dirname(self.log_dir)] if default else [])
        if self._http is not None:
            await self._http.aclose()

    async def _stop_starting(self, record: InstanceRecord) -> None:
        with contextlib.suppress(Exception):  # the forkserver may be gone: its instances with it
            client = await self.forkserver.client()
            await client.request(protocol.OP_STOP, instance_id=record.instance_id,
                                 grace_seconds=self._settings.stop_timeout_starting)  # fmt: skip

    # ------------------------------------------------------------------ memory

    async def _sample_memory_forever(self) -> None:
        while True:
            live = [record for record in self._records.values() if record.live]
            if live:
                try:
                    sampled = await asyncio.to_thread(self._measure, live)
                except Exception:  # noqa: BLE001 - a bad sample must not end sampling
                    log.exception("memory sampling failed")
                    sampled = {}
                for record in live:
                    footprint = sampled.get(record.instance_id)
                    if footprint is not None and record.live:
                        record.memory = footprint
                        record.memory_peak = (
                            footprint if record.memory_peak is None else record.memory_peak.peak(footprint)
                        )
            await asyncio.sleep(MEMORY_SAMPLE_SECONDS)

    def _measure(self, live: list[InstanceRecord]) -> dict[str, Footprint]:
        """The footprints of the instances whose memory may have moved (run in a worker thread: it
        reads /proc); the others keep their last sample."""
        self._schedule.keep_only(record.instance_id for record in live)
        records = [record for record in live if self._schedule.due(record.instance_id, starting=not record.ready)]
        trees = {record.instance_id: memory.process_tree(record.pid) for record in records}
        real_gpus = bool(self.gpus) and not self._settings.mock_gpus
        by_pid = memory.nvml_gpu_bytes([pid for tree in trees.values() for pid in tree]) if real_gpus else {}
        sizes = {gpu.uuid: (gpu.memory_mib or 0) * 2**20 for gpu in self.gpus}
        found = {}
        for record in records:
            if real_gpus:  # the tree's processes, added up per device
                gpu_bytes: dict[str, int] = {}
                for pid in trees[record.instance_id]:
                    for uuid, used in by_pid.get(pid, {}).items():
                        gpu_bytes[uuid] = gpu_bytes.get(uuid, 0) + used
            else:  # mock GPUs: what vLLM would take of each device it is given (asleep: its CUDA context)
                share = memory.gpu_utilization(record.config.options)
                gpu_bytes = {uuid: int(share * sizes.get(uuid, 0)) for uuid in record.config.gpu_uuids or []}
                if record.asleep:
                    gpu_bytes = {uuid: min(MOCK_ASLEEP_GPU_BYTES, used) for uuid, used in gpu_bytes.items()}
            found[record.instance_id] = Footprint(memory.pss_bytes(trees[record.instance_id]), gpu_bytes)
            self._schedule.sampled(record.instance_id, trees[record.instance_id], found[record.instance_id])
        # A zygote's copy of the weights is its instances' too: each live one counts an equal share
        # of it (PSS already splits the pages they share), so the sum is what the node spends.
        sharers: dict[int, int] = {}
        for record in live:
            if record.zygote_pid is not None:
                sharers[record.zygote_pid] = sharers.get(record.zygote_pid, 0) + 1
        zygote_bytes = {pid: memory.pss_bytes([pid]) for pid in {r.zygote_pid for r in records} if pid is not None}
        for record in records:
            if record.zygote_pid is not None:
                footprint = found[record.instance_id]
                share = zygote_bytes[record.zygote_pid] // sharers[record.zygote_pid]
                found[record.instance_id] = Footprint(footprint.host_bytes + share, footprint.gpu_bytes)
        return found

    @property
    def sleep_mode_available(self) -> bool:
        """Whether instances here can use vLLM's sleep mode (the forkserver's workload says; CPU: no)."""
        return bool(self.forkserver.hello.get("sleep_mode"))

    def mark_asleep(self, record: InstanceRecord, asleep: bool) -> None:
        """The front door put ``record``'s instance to sleep, or woke it: a MODIFIED event says so."""
        if record.asleep != asleep and record.live:
            record.asleep = asleep
            self._schedule.changed()
            self._publish(events.MODIFIED, record)
            self._note_later(record.instance_id, {"asleep": asleep})  # for an API restart

    # ------------------------------------------------------------------ queries

    def get(self, instance_id: str) -> InstanceRecord:
        """The record of ``instance_id`` or a 404."""
        record = self._records.get(instance_id)
        if record is None:
            raise NotFound(f"instance {instance_id!r} not found")
        return record

    def all(self) -> list[InstanceRecord]:
        """Every instance, oldest first."""
        return list(self._records.values())

    def _metrics_snapshot(self) -> StateSnapshot:
        return StateSnapshot(
            instances=count_instances((record.status.value, record.ready) for record in self._records.values()),
            forkserver_up=self.forkserver.ready,
            forkserver_restarts=self.forkserver.restarts,
            watchers=self.events.watchers,
            revision=self.events.revision,
            memory={
                record.instance_id: (record.memory.host_bytes, dict(record.memory.gpu_bytes))
                for record in self._records.values()
                if record.live and record.memory is not None
            },  # fmt: skip
        )

    async def validate(self, config: VllmConfig) -> None:
        """Ask the workload's own parser (vLLM's, in the forkserver) whether ``config``'s options
        would start an instance; a 400 naming the problem if not. Nothing is forked."""
        argv = config.argv(shell=not self._settings.fma_compat)
        try:
            client = await self.forkserver.client()
            await client.request(protocol.OP_VALIDATE, argv=argv)
        except ForkserverError as exc:
            raise _http_error(exc) from None

    def live_count(self) -> int:
        """Live instances plus creates in progress: what ``max_instances`` limits."""
        return sum(record.live for record in self._records.values()) + len(self._reserved)

    async def wait_settled(self, instance_id: str) -> InstanceRecord:
        """Wait until ``instance_id`` is ready or has stopped; its record then."""
        record = self.get(instance_id)
        runtime = self._runtime[instance_id]
        if record.ready or not record.live:
            return record
        waiters = {asyncio.ensure_future(runtime.ready.wait()), asyncio.ensure_future(runtime.stopped.wait())}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return record

    @staticmethod
    def _start_phases(record: InstanceRecord) -> dict[str, float] | None:
        # The markers come before the server answers: the head of a young log holds them all.
        try:
            with open(record.log_path, "rb") as log_file:
                head = log_file.read(PHASE_LOG_BYTES)
        except OSError:
            return None
        ready_at = record.ready_at if record.ready_at is not None else time.time()
        return phases.start_phases(phases.read(head), received_at=record.received_at, ready_at=ready_at)

    @staticmethod
    def start_progress(record: InstanceRecord) -> str:
        """The start phase ``record``'s instance is in, in a few words (from its log's markers)."""
        try:
            with open(record.log_path, "rb") as log_file:
                marks = phases.read(log_file.read(PHASE_LOG_BYTES))
        except OSError:
            marks = {}
        if record.ready:
            return "ready"
        latest = max(marks, key=marks.__getitem__, default=None)
        return _PROGRESS.get(latest or "", "forking" if latest else "starting")  # no markers: a stand-in

    @staticmethod
    def log_tail(record: InstanceRecord, lines: int = 20) -> str:
        """The last ``lines`` lines of the instance's log (for error messages)."""
        try:
            with open(record.log_path, "rb") as log_file:
                log_file.seek(0, os.SEEK_END)
                log_file.seek(max(0, log_file.tell() - TAIL_BYTES))
                tail = log_file.read()
        except OSError:
            return ""
        return "\n".join(tail.decode(errors="replace").splitlines()[-lines:])

    def gpu_table(self) -> list[dict[str, Any]]:
        """Each GPU with the live instances pinned to it."""
        users: dict[str, list[str]] = {gpu.uuid: [] for gpu in self.gpus}
        for record in self._records.values():
            if record.live:
                for gpu_uuid in record.config.gpu_uuids or []:
                    users.setdefault(gpu_uuid, []).append(record.instance_id)
        return [{**gpu.to_json(), "instances": users.get(gpu.uuid, [])} for gpu in self.gpus]

    # ------------------------------------------------------------------ create

    async def create(
        self, config: VllmConfig, instance_id: str | None, *, received_at: float, nice: int = 0
    ) -> InstanceRecord:
        """Fork a new instance once every check has passed; nothing is left behind on failure.

        ``nice`` (0-19) lowers the instance's CPU priority (the front door's compile-ahead).
        """
        try:
            record = await self._create(config, instance_id, received_at=received_at, nice=nice)
        except LauncherError as exc:
            self.metrics.create_failures.labels(reason=_FAILURE_REASONS.get(type(exc), "internal")).inc()
            raise
        self.metrics.creates.inc()
        return record

    async def _create(
        self, config: VllmConfig, instance_id: str | None, *, received_at: float, nice: int
    ) -> InstanceRecord:
        instance_id = check_instance_id(instance_id) if instance_id is not None else str(uuid.uuid4())
        if instance_id in self._records or instance_id in self._reserved:
            raise Conflict(f"instance {instance_id!r} already exists")
        self._check_limit()
        argv = config.argv(shell=not self._settings.fma_compat)
        env = self._environment(config)
        if config.gpu_uuids is not None:  # echoed as FMA's launcher does: the env_vars the instance got
            config = config.model_copy(update={"env_vars": {**(config.env_vars or {}), **env}})
        reservation = _Reservation(instance_id, config)
        self._reserved[instance_id] = reservation
        cancelled = False
        try:
            client = await self.forkserver.client()
            parsed = await self._validate_for_create(client, argv)
            unstartable: str | None = parsed.get("unstartable")
            if unstartable is None and parsed["port_given"]:
                try:
                    reservation.port = self._check_port(int(parsed["port"]))
                except (BadRequest, Conflict) as exc:
                    if not self._settings.fma_compat:
                        raise
                    unstartable = exc.detail  # FMA's launcher forks anyway: the instance cannot bind
            if unstartable is not None:
                if len(unstartable) > UNSTARTABLE_REASON_CHARS:  # the parser's message may repeat the options
                    unstartable = unstartable[:UNSTARTABLE_REASON_CHARS] + " [...]"
                # FMA's flow: the instance is made and stops at once, saying why (on a free port: it
                # never listens, so no probe can take another server's answer for its own).
                log.info("instance %s cannot start (%s); made anyway, as FMA's launcher does", instance_id, unstartable)
                reservation.port = ports.pick_free_port(self._ports_in_use())
                argv = [*argv, "--port", str(reservation.port)]
            elif not parsed["port_given"]:
                reservation.port = ports.pick_free_port(self._ports_in_use())
                argv = [*argv, "--port", str(reservation.port)]
            if parsed.get("host") is None and self._settings.host not in ALL_ADDRESSES:
                # No --host in its options: the launcher's own address, not every address (a launcher on
                # loopback opens nothing). On 0.0.0.0 (FMA's pods) vLLM's default stays: every address.
                argv = [*argv, "--host", self._settings.host]
                parsed = {**parsed, "host": self._settings.host}
            if reservation.cancelled:
                reservation.taken_back = True
                raise TakenBack(f"instance {instance_id!r} was deleted before it was forked")
            reservation.spawning = True
            spawn = asyncio.ensure_future(client.request(
                protocol.OP_SPAWN,
                instance_id=instance_id,
                argv=argv,
                env=env,
                log_path=os.path.join(self.log_dir, f"{instance_id}.log"),
                nice=nice,
                **({"unstartable": unstartable} if unstartable is not None else {}),
                # Kept by the forkserver so that an API attaching later can rebuild the state.
                meta={
                    "config": config.model_dump(exclude_none=True),
                    "received_at": received_at,
                    "host": parsed.get("host"),
                },
            ))  # fmt: skip
            # Once asked, the fork is finished and recorded even if this create is cancelled meanwhile
            # (a client gone, a front-door start stopped): an instance no record knows would run unseen.
            while not spawn.done():
                try:
                    await asyncio.shield(spawn)
                except asyncio.CancelledError:
                    cancelled = True
            reply = spawn.result()
        except ForkserverError as exc:
            if reservation.cancelled and exc.kind == protocol.KIND_CONFLICT:
                raise TakenBack(str(exc)) from None
            raise _http_error(exc) from None
        finally:
            self._reserved.pop(instance_id, None)
            reservation.done.set()
            # Another client's instance of this id (our create failed on it: the forkserver has it): ours now.
            forked = self._forked_while_reserved.pop(instance_id, None)
            if forked is not None:
                self._adopt_forked(forked)
        record = InstanceRecord(
            instance_id=instance_id,
            config=config,
            log_path=str(reply["log_path"]),
            pid=int(reply["pid"]),
            port=int(reply["port"]),
            model=str(reply["model"]),
            received_at=received_at,
            created_at=float(reply["forked_at"]),
            host=parsed.get("host"),
            zygote_pid=reply.get("zygote_pid"),
        )
        self._records[instance_id] = record
        runtime = self._runtime[instance_id] = _Runtime()
        self._schedule.changed()  # its pages are shared with the forkserver and the others now
        self._publish(events.CREATED, record)
        early = self._early_exits.pop(instance_id, None)
        if early is not None:
            self._on_event(early)
        else:
            runtime.probe = asyncio.create_task(self._probe(record), name=f"probe-{instance_id}")
        log.info("created instance %s (pid %s, port %s)", instance_id, record.pid, record.port)
        if cancelled:
            raise asyncio.CancelledError  # listed, so that whoever cancelled it (or anyone) can delete it
        return record

    async def _validate_for_create(self, client: ForkserverClient, argv: list[str]) -> dict[str, Any]:
        """vLLM's parser's view of ``argv``; under ``--fma-compat``, options it rejects are no error
        (llm-d FMA's launcher answers 201 and its instance stops: FMA's controller reads that)."""
        try:
            parsed: dict[str, Any] = await client.request(protocol.OP_VALIDATE, argv=argv)
        except ForkserverError as exc:
            if not (self._settings.fma_compat and exc.kind == protocol.KIND_INVALID):
                raise
            return {"unstartable": str(exc), "host": None, "port_given": False}
        return parsed

    def _check_limit(self) -> None:
        limit = self._settings.max_instances
        live = self.live_count()
        if limit and live >= limit:
            raise TooManyInstances(
                f"the launcher already runs {live} instance(s), its limit (max_instances={limit}); delete one first",
                headers={"Retry-After": "1"},
            )

    def _environment(self, config: VllmConfig) -> dict[str, str]:
        """The instance's own variables: ``env_vars``, with ``CUDA_VISIBLE_DEVICES`` from ``gpu_uuids``
        when given (they win over an ``env_vars`` value, as in FMA's launcher; the answer warns)."""
        env = dict(config.env_vars or {})
        if config.gpu_uuids is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus.visible_devices(config.gpu_uuids, self.gpus)
        return env

    def _ports_in_use(self) -> set[int]:
        taken = {record.port for record in self._records.values() if record.live}
        return taken | {item.port for item in self._reserved.values() if item.port is not None}

    def _check_port(self, port: int) -> int:
        if not 1 <= port <= 65535:
            raise BadRequest(f"--port {port} is not a TCP port: use 1-65535 (or leave it out to get a free one)")
        for record in self._records.values():
            if record.live and record.port == port:
                raise Conflict(f"port {port} is already used by instance {record.instance_id!r}")
        for item in self._reserved.values():
            if item.port == port:
                raise Conflict(f"port {port} is already claimed by instance {item.instance_id!r}, being created")
        try:
            bound = ports.port_is_bound(port)
        except PermissionError:  # below the first unprivileged port, without CAP_NET_BIND_SERVICE: as any non-root pod
            raise BadRequest(
                f"port {port} cannot be bound: permission denied for the launcher's user (uid {os.geteuid()}), "
                f"whose instances run as it; use a port of {ports.first_unprivileged_port()} or more"
            ) from None
        if bound:
            raise Conflict(f"port {port} is busy: another process on this host listens on it")
        return port

    async def _probe(self, record: InstanceRecord) -> None:
        assert self._http is not None
        url = f"http://{readiness.probe_host(record.host)}:{record.port}/health"

        def became_ready() -> None:
            if record.mark_ready():
                self._schedule.changed()  # its start is done touching pages it shares with the others
                record.start_phases = self._start_phases(record)
                runtime = self._runtime.get(record.instance_id)
                if runtime is not None:
                    runtime.ready.set()
                self._publish(events.READY, record)
                seconds = (record.ready_at or record.received_at) - record.received_at
                self.metrics.start_seconds.observe(max(0.0, seconds))
                breakdown = ", ".join(f"{name} {value:.2f}" for name, value in (record.start_phases or {}).items())
                log.info("instance %s ready in %.2f s%s", record.instance_id, seconds,
                         f" ({breakdown})" if breakdown else "")  # fmt: skip
                self._note_later(record.instance_id, {"ready_at": record.ready_at})

        await readiness.wait_ready(
            self._http, url, still_starting=lambda: record.live and not record.ready, on_ready=became_ready
        )

    def _note_later(self, instance_id: str, meta: dict[str, Any]) -> None:
        """Have the forkserver keep ``meta`` with the instance (an API attaching later reads it)."""
        note = asyncio.create_task(self._note(instance_id, meta))
        self._background.add(note)  # keep a reference until it is done
        note.add_done_callback(self._background.discard)

    async def _note(self, instance_id: str, meta: dict[str, Any]) -> None:
        with contextlib.suppress(ForkserverError, LauncherError):
            client = await self.forkserver.client()
            await client.request(protocol.OP_NOTE, instance_id=instance_id, meta=meta)

    def on_adopted(self, listener: Callable[[list[InstanceRecord]], None]) -> None:
        """Call ``listener`` with the records each attach adopted (the front door takes its own back)."""
        self._adoption_listeners.append(listener)

    async def _adopt(self, hello: dict[str, Any]) -> None:
        """Take over the instances a forkserver already holds (one started on its own)."""
        adopted: list[InstanceRecord] = []
        try:
            await self._adopt_each(hello, adopted)
        finally:
            for listener in self._adoption_listeners:
                listener(adopted)

    async def _adopt_each(self, hello: dict[str, Any], adopted: list[InstanceRecord]) -> None:
        # An instance adopted from a `forked` event read with (or before) this hello's reply is newer than it.
        held = {str(item["instance_id"]) for item in hello.get("instances", [])} | self._adopted_since_hello
        self._adopted_since_hello = set()
        for known in list(self._records.values()):
            if known.live and known.instance_id not in held:  # the forkserver we knew is gone, and they with it
                self._stopped(
                    known, exit_code=None, stopped_at=None, reason="not held by the forkserver reconnected to"
                )
        for item in hello.get("instances", []):
            self._adopt_one(item, adopted)

    def _adopt_forked(self, item: dict[str, Any]) -> None:
        adopted: list[InstanceRecord] = []
        self._adopt_one(item, adopted)
        self._adopted_since_hello.update(record.instance_id for record in adopted)
        for listener in self._adoption_listeners:
            listener(adopted)

    def _adopt_one(self, item: dict[str, Any], adopted: list[InstanceRecord]) -> None:
        """Record an instance the forkserver holds (as its hello or a ``forked`` event describes it)."""
        instance_id = str(item["instance_id"])
        record = self._records.get(instance_id)
        if record is None:
            record = self._record_from(item)
            if record is None:
                return
            self._records[instance_id] = record
            runtime = self._runtime[instance_id] = _Runtime()
            self._publish(events.CREATED, record)
            if record.live and not record.ready:
                runtime.probe = asyncio.create_task(self._probe(record), name=f"probe-{instance_id}")
            log.info("adopted instance %s (pid %s, %s)", instance_id, record.pid, record.status.value)
            adopted.append(record)
        if not item.get("running") and record.live:
            self._stopped(record, exit_code=item.get("exit_code"), stopped_at=item.get("stopped_at"), reason=None)

    def _record_from(self, item: dict[str, Any]) -> InstanceRecord | None:
        meta = item.get("meta") or {}
        try:
            config = validate_config(meta.get("config"), empty_options=True)  # as it was once accepted
        except ValueError:
            log.warning("not adopting instance %s: it was not created by a launcher", item.get("instance_id"))
            return None
        record = InstanceRecord(
            instance_id=str(item["instance_id"]),
            config=config,
            log_path=str(item["log_path"]),
            pid=int(item["pid"]),
            port=int(item["port"]),
            model=str(item["model"]),
            received_at=float(meta.get("received_at") or item["forked_at"]),
            created_at=float(item["forked_at"]),
            host=meta.get("host"),
            zygote_pid=item.get("zygote_pid"),
        )
        if meta.get("ready_at"):
            record.mark_ready(at=float(meta["ready_at"]))
        record.asleep = bool(meta.get("asleep"))
        if not item.get("running"):
            record.mark_stopped(exit_code=item.get("exit_code"), stopped_at=item.get("stopped_at"))
        return record

    # ------------------------------------------------------------------ delete

    async def delete(self, instance_id: str) -> dict[str, Any]:
        """Stop ``instance_id`` (if running), wait until no process of it is left, forget it."""
        creating = self._reserved.get(instance_id)
        if creating is not None:
            # A create still under way: taken back if it is not forked yet (a fork waiting for its
            # model's zygote to load: the load may take minutes), else deleted once it exists.
            self.cancel_create(instance_id)
            await creating.done.wait()
            if creating.cancelling is not None:
                await creating.cancelling
            if creating.taken_back and instance_id not in self._records:
                log.info("instance %s deleted before it was forked", instance_id)
                return {"status": "terminated", "instance_id": instance_id, **creating.config.echo(),
                        "revision": self.events.revision}  # fmt: skip
        task = self._deleting.get(instance_id)
        if task is None:
            record = self.get(instance_id)
            self._runtime[instance_id].deleting = True
            task = asyncio.create_task(self._delete(record), name=f"delete-{instance_id}")
            self._deleting[instance_id] = task
        # Shielded: a client that hangs up mid-DELETE does not leave a half-deleted instance.
        return await asyncio.shield(task)

    def cancel_create(self, instance_id: str) -> None:
        """Take back a create under way if its instance is not forked yet (it waits for its model's
        zygote): that create then fails with a 409 and leaves nothing. A fork already asked for is
        finished (0.2 s) and its create succeeds: delete it then."""
        reservation = self._reserved.get(instance_id)
        if reservation is None or reservation.cancelled:
            return
        reservation.cancelled = True
        if reservation.spawning:  # sent after the spawn on the same connection, so read after it
            task = asyncio.create_task(self._cancel_spawn(reservation), name=f"cancel-{instance_id}")
            reservation.cancelling = task
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _cancel_spawn(self, reservation: _Reservation) -> None:
        with contextlib.suppress(ForkserverError):
            client = await self.forkserver.client()
            reply = await client.request(protocol.OP_CANCEL, instance_id=reservation.instance_id)
            reservation.taken_back = bool(reply.get("cancelled"))

    async def delete_all(self) -> list[dict[str, Any]]:
        """Delete every instance concurrently."""
        results = await asyncio.gather(
            *(self.delete(instance_id) for instance_id in [*self._records, *self._reserved]), return_exceptions=True
        )
        return [result for result in results if isinstance(result, dict)]

    async def _delete(self, record: InstanceRecord) -> dict[str, Any]:
        instance_id = record.instance_id
        runtime = self._runtime[instance_id]
        try:
            if record.live:
                # vLLM 0.32 can ignore SIGTERM while starting: do not wait long for it then.
                grace = self._settings.stop_timeout if record.ready else self._settings.stop_timeout_starting
                try:
                    client = await self.forkserver.client()
                    await client.request(protocol.OP_STOP, instance_id=instance_id, grace_seconds=grace)
                except ForkserverGone:
                    pass  # the forkserver is gone, and its instances with it; _on_forkserver_lost marks them
                await runtime.stopped.wait()
            if runtime.probe is not None:
                runtime.probe.cancel()
            if self.forkserver.ready:
                with contextlib.suppress(ForkserverError):
                    client = await self.forkserver.client()
                    await client.request(protocol.OP_FORGET, instance_id=instance_id)
            await asyncio.to_thread(self._remove_log, record.log_path)
            self._records.pop(instance_id, None)
            self._runtime.pop(instance_id, None)
            self._publish(events.DELETED, record)
            self.metrics.deletes.inc()
            log.info("deleted instance %s", instance_id)
            # The seed's fields, then the instance's configuration and revision, as FMA's launcher answers.
            return {
                "status": "terminated",
                "instance_id": instance_id,
                **record.config.echo(),
                "revision": record.revision,
            }
        finally:
            self._deleting.pop(instance_id, None)

    @staticmethod
    def _remove_log(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    # ------------------------------------------------------------------ events

    def _publish(self, event_type: str, record: InstanceRecord) -> None:
        record.revision = self.events.next_revision()
        self.events.publish(event_type, record.to_json())

    def _stopped(
        self, record: InstanceRecord, *, exit_code: int | None, stopped_at: float | None, reason: str | None
    ) -> None:
        runtime = self._runtime[record.instance_id]
        if not record.mark_stopped(exit_code=exit_code, stopped_at=stopped_at, reason=reason):
            return
        self._schedule.changed()  # the pages it shared are split between fewer now
        # As the public launcher does: deleting a running instance reports DELETED only.
        if not runtime.deleting:
            self._publish(events.STOPPED, record)
            self.metrics.exits.labels(how=exit_kind(exit_code)).inc()
        runtime.stopped.set()
        log.info("instance %s stopped: exit code %s%s", record.instance_id, exit_code, f" ({reason})" if reason else "")

    def _on_event(self, message: dict[str, Any]) -> None:
        if message.get("event") == protocol.EVENT_FORKED:
            # Forked for another client (an API before this one) once its zygote had loaded: ours now,
            # or once our own create of that id has failed on it.
            if message.get("instance_id") in self._reserved:
                self._forked_while_reserved[str(message.get("instance_id"))] = message
            else:
                self._adopt_forked(message)
            return
        if message.get("event") != protocol.EVENT_EXITED:
            return
        instance_id = str(message.get("instance_id"))
        record = self._records.get(instance_id)
        if record is None:
            if instance_id in self._reserved:
                self._early_exits[instance_id] = message  # exited before create() recorded it
            return
        exit_code = message.get("exit_code")
        code = int(exit_code) if isinstance(exit_code, int) else None
        runtime = self._runtime.get(instance_id)
        # An instance that failed by itself says why in its log's last error (a signal leaves none).
        failed = code is not None and code > 0 and not (runtime is not None and runtime.deleting)
        self._stopped(
            record,
            exit_code=code,
            stopped_at=message.get("stopped_at") or time.time(),
            reason=read_failure_reason(record.log_path) if failed else None,
        )

    async def _on_forkserver_lost(self, reason: str) -> None:
        self._adopted_since_hello.clear()  # events of the lost connection: the next hello says what is held
        for record in list(self._records.values()):
            if not record.live:
                continue
            if self.forkserver.external and _pid_alive(record.pid):
                continue  # only the connection may be gone: the reconnect's hello tells (_adopt)
            self._stopped(record, exit_code=None, stopped_at=None, reason=reason)
