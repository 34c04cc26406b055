"""Prometheus metrics at ``GET /metrics``, in a registry of the app's own (no global state)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response


@dataclass(frozen=True)
class StateSnapshot:
    """What the gauges show, taken from the instance manager at scrape time (it imports this module)."""

    instances: dict[tuple[str, bool], int]  # (status, ready) -> how many
    forkserver_up: bool
    forkserver_restarts: int
    watchers: int
    revision: int
    memory: dict[str, tuple[int, dict[str, int]]] = field(default_factory=dict)  # id -> (host, gpu by uuid)


START_BUCKETS = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class _StateCollector(Collector):
    """Gauges read from the manager at scrape time, so they can never be out of date."""

    def __init__(self, snapshot: Callable[[], StateSnapshot | None]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        state = self._snapshot()
        if state is None:
            return
        instances = GaugeMetricFamily(
            "launcher_instances", "Instances by status and readiness", labels=["status", "ready"]
        )
        for status in ("running", "stopped"):
            for ready in (True, False):
                instances.add_metric([status, str(ready).lower()], state.instances.get((status, ready), 0))
        yield instances
        yield GaugeMetricFamily("launcher_forkserver_up", "1 while the forkserver accepts requests",
                                value=1 if state.forkserver_up else 0)  # fmt: skip
        yield GaugeMetricFamily(
            "launcher_forkserver_restarts", "Times the forkserver was replaced (or reconnected)",
            value=state.forkserver_restarts,
        )  # fmt: skip
        yield GaugeMetricFamily("launcher_watchers", "Open watch streams", value=state.watchers)
        yield GaugeMetricFamily("launcher_revision", "Current event revision", value=state.revision)
        host = GaugeMetricFamily("launcher_instance_host_memory_bytes", "Host memory (PSS of its processes) of a "
                                 "running instance", labels=["instance_id"])  # fmt: skip
        gpu = GaugeMetricFamily("launcher_instance_gpu_memory_bytes", "GPU memory of a running instance, by device",
                                labels=["instance_id", "gpu_uuid"])  # fmt: skip
        for instance_id, (host_bytes, gpu_bytes) in sorted(state.memory.items()):
            host.add_metric([instance_id], host_bytes)
            for uuid, used in sorted(gpu_bytes.items()):
                gpu.add_metric([instance_id, uuid], used)
        yield host
        yield gpu


class LauncherMetrics:
    """Counters and histograms the launcher updates as things happen."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.creates = Counter("launcher_instance_creates", "Instances created", registry=self.registry)
        self.create_failures = Counter(
            "launcher_instance_create_failures", "Create requests refused or failed, by reason",
            ["reason"], registry=self.registry,
        )  # fmt: skip
        self.deletes = Counter("launcher_instance_deletes", "Instances deleted", registry=self.registry)
        self.exits = Counter(
            "launcher_instance_exits", "Instances that ended by themselves, by how",
            ["how"], registry=self.registry,
        )  # fmt: skip
        self.start_seconds = Histogram(
            "launcher_instance_start_seconds", "Create request received to first healthy answer",
            buckets=START_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.log_bytes = Counter("launcher_log_bytes_served", "Log bytes served", registry=self.registry)
        self._snapshot: Callable[[], StateSnapshot] | None = None
        self.registry.register(_StateCollector(lambda: self._snapshot() if self._snapshot is not None else None))

    def attach(self, snapshot: Callable[[], StateSnapshot]) -> None:
        """Read the instance gauges from ``snapshot()`` from now on."""
        self._snapshot = snapshot


class FrontDoorMetrics:
    """The front door's counters, in the launcher's registry."""

    def __init__(self, registry: CollectorRegistry, *, queue_depth: Callable[[], int]) -> None:
        self.requests = Counter(
            "launcher_front_door_requests", "Front-door requests by model and HTTP status",
            ["model", "status"], registry=registry,
        )  # fmt: skip
        self._request_counters: dict[tuple[str, int], Counter] = {}
        self.starts = Counter(
            "launcher_front_door_starts", "On-demand starts by model and outcome (ready, failed, no_room)",
            ["model", "outcome"], registry=registry,
        )  # fmt: skip
        self.start_seconds = Histogram(
            "launcher_front_door_start_seconds", "On-demand start: first request to a ready instance",
            ["model"], buckets=START_BUCKETS, registry=registry,
        )  # fmt: skip
        self.evictions = Counter(
            "launcher_front_door_evictions",
            "Idle instances stopped to make room, by model",
            ["model"],
            registry=registry,
        )
        self.idle_stops = Counter(
            "launcher_front_door_idle_stops", "Instances stopped after their idle timeout, by model", ["model"],
            registry=registry,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "launcher_front_door_upstream_errors",
            "Answers cut off because the instance failed or went silent mid-answer, by model",
            ["model"],
            registry=registry,
        )
        self.sleeps = Counter(
            "launcher_front_door_sleeps", "Instances put to sleep (idle: sleep), by model and reason (idle, room)",
            ["model", "reason"], registry=registry,
        )  # fmt: skip
        self.wakes = Counter(
            "launcher_front_door_wakes", "Sleeping instances woken, by model and outcome (ok, failed: stopped instead)",
            ["model", "outcome"], registry=registry,
        )  # fmt: skip
        self.wake_seconds = Histogram(
            "launcher_front_door_wake_seconds", "A wake: the request to the instance awake",
            ["model"], buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0), registry=registry,
        )  # fmt: skip
        self.sleeping = Gauge("launcher_front_door_sleeping", "Models whose instance is asleep", registry=registry)
        self.reloads = Counter(
            "launcher_models_file_reloads", "Reads of a changed models file, by outcome (applied, error)",
            ["outcome"], registry=registry,
        )  # fmt: skip
        self.file_error = Gauge("launcher_models_file_error", "1 while the models file cannot be read (the last "
                                "good one runs)", registry=registry)  # fmt: skip
        self.invalid = Gauge("launcher_front_door_invalid_models", "Models whose profile cannot run",
                             registry=registry)  # fmt: skip
        depth = Gauge(
            "launcher_front_door_queue_depth", "Requests waiting for a model that is not ready", registry=registry
        )
        depth.set_function(queue_depth)

    def count_request(self, model: str, status: int) -> None:
        """One front-door request answered with ``status`` (the labelled child kept: the hot path)."""
        counter = self._request_counters.get((model, status))
        if counter is None:
            counter = self._request_counters[(model, status)] = self.requests.labels(model=model, status=str(status))
        counter.inc()


def count_instances(states: Iterable[tuple[str, bool]]) -> dict[tuple[str, bool], int]:
    """How many instances per (status, ready)."""
    return dict(Tally(states))


def exit_kind(exit_code: int | None) -> str:
    """How an instance ended, as a metric label."""
    if exit_code is None:
        return "unknown"
    if exit_code < 0:
        return "signal"
    return "clean" if exit_code == 0 else "error"


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics``: the Prometheus text format."""
    registry: CollectorRegistry = request.app.state.manager.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class ConnectionCounts(Protocol):
    """What :class:`UpstreamConnections` reads: the front door's pool of connections to instances."""

    opened: int
    reused: int

    def idle_connections(self) -> dict[tuple[str, int], int]: ...


class UpstreamConnections(Collector):
    """How often the front door's proxy connects to an instance, and how often it reuses a kept one."""

    def __init__(self, pool: ConnectionCounts) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        sent = CounterMetricFamily("launcher_front_door_upstream_connections",
                                   "Requests sent by the front door on a new connection or a kept-alive one",
                                   labels=["connection"])  # fmt: skip
        sent.add_metric(["new"], self._pool.opened)
        sent.add_metric(["reused"], self._pool.reused)
        yield sent
        yield GaugeMetricFamily("launcher_front_door_upstream_idle_connections",
                                "Kept-alive connections to instances, idle now",
                                value=sum(self._pool.idle_connections().values()))  # fmt: skip
