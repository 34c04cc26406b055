"""llm-d FMA's dual-pods controller, replayed against real launchers: the launcher and instance
calls it makes in FMA's end-to-end cases, with the answers its code needs.

Followed: llm-d-incubation/llm-d-fast-model-actuation at commit 553c7b7 ("Make production of
coverage data optional (#718)", the HEAD of the fetched history). The controller's launcher-facing
code is ``pkg/controller/dual-pods/inference-server.go`` (``infSvrItem.process``,
``selectOrReclaimLauncherPod``, ``syncLauncherInstances``, ``ensureUnbound``,
``maybeDeleteObsoleteInstance``, ``instanceGCItem.process``, ``querySleeping``, ``wakeUp``,
``configInferenceServer``) with its client ``pkg/controller/dual-pods/launcherclient.go``; the
launcher pod it builds is ``pkg/controller/utils/pod-helper.go`` (liveness ``GET /health`` and
readiness ``GET /v2/vllm/instances`` on 8001; env ``PYTHONPATH=/app``, ``VLLM_SERVER_DEV_MODE=1``);
the cases are ``test/e2e/test-cases.sh`` with the objects of ``test/e2e/mkobjs.sh`` (ISCs on ports
8005, 8006, 8007 with options ``--model X`` and ``VLLM_SERVER_DEV_MODE=1`` in ``env_vars``;
``maxInstances: 2``; one launcher per node, ``python3 launcher.py --mock-gpus --host 0.0.0.0 --port
8001 --log-level info``).

What the controller does with a launcher, as that code has it:

- It lists with ``GET /v2/vllm/instances`` (no query: ``ListInstanceIDs``' ``?detail=false`` is
  never called), reads one with ``GET /v2/vllm/instances/{id}``, creates with ``PUT .../{id}`` (the
  id is ``"I" + base64url(sha256(ISC modelServerConfig as YAML + ";gpus=" + GPUs)) + "i"``) and
  deletes with ``DELETE .../{id}``. Never ``POST``, delete-all, logs or watch.
- Of an instance it reads ``instance_id``, ``status`` (``"stopped"`` or not), ``gpu_uuids`` and
  ``annotations`` (``isc-name``, ``inference-port``); Go's decoder also types ``options`` and
  ``env_vars`` (a wrong JSON type fails the whole list). Of a list: ``total_instances``,
  ``running_instances``, ``instances``.
- Any answer >= 300, or no answer, is an error; only 404 is told apart (``DELETE`` or ``GET`` of
  one: already gone). A failed create is retried with backoff; a stopped bound instance is final:
  the requester pod is deleted (the stopped instance by a later sync).
- It talks to vLLM itself, on the pod IP and the ISC's port: ``GET /is_sleeping``
  (``{"is_sleeping": bool}``; asked when not known, again 5 s after an error), ``POST /sleep`` and
  ``POST /wake_up``, without query or body.

Each launcher runs as FMA's launcher pod runs: ``deploy/fma/app/launcher.py`` (our
``/app/launcher.py``) with FMA's flags, in that directory, ``PYTHONPATH`` starting with it,
``VLLM_SERVER_DEV_MODE=1``, and the stand-in workload. Where ``unshare`` can make a network
namespace, each pod has its own (``tests/fma_pod.py``): the launcher on 8001 and instances on
8005-8008, as in FMA's e2e, reached through relays. Elsewhere pods share this host's ports (free
ones instead) and the same-node port collision case is skipped.

``Controller`` keeps what the Go code keeps between calls: per requester its serverData (instance
id and config, bound launcher, known-to-exist, sleeping), per launcher the last-used times
(``launcherData.Instances``, set at creation). Pods, bindings and ISCs are a few objects here, and
retries are 0.05 s apart (not 5 s or the work queue's backoff). Each case asserts the calls that
change something (PUT, DELETE, POST) exactly, in order, with their status codes; the reads are
checked as the Go code decodes them.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from tests.launcher_process import REPO, free_port, wait_until

APP = REPO / "deploy" / "fma" / "app"
API_PORT = 8001  # ctlrcommon.LauncherServicePort
MAX_INSTANCES = 2  # the e2e LauncherConfig's maxInstances
RETRY_SECONDS = 0.05  # the controller: 5 s after a failed /is_sleeping, else its work queue's backoff
E2E_ENV = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_LOGGING_LEVEL": "DEBUG", "VLLM_CPU_KVCACHE_SPACE": "1"}
SMOL, QWEN, TINY, BROKEN = "isc-smol", "isc-qwen", "isc-tiny", "isc-broken"
GPU = ["GPU-0"]  # the requester's GPU, pinned by the e2e (pin_gpu) so that every case reuses it

READY, REQUESTER_DELETED, AGAIN, RETRY = "ready", "requester-deleted", "again", "retry"


# ----------------------------------------------------------------------------- FMA's objects


@dataclass(frozen=True)
class ISC:
    """An InferenceServerConfig's ``modelServerConfig``, as test/e2e/mkobjs.sh writes them."""

    name: str
    port: int
    options: str
    env_vars: dict[str, str] = field(default_factory=lambda: dict(E2E_ENV))
    labels: dict[str, str] = field(default_factory=lambda: {"e2e-test.fma.llm-d.ai/isc-label": "test-value"})
    annotations: dict[str, str] = field(default_factory=lambda: {"e2e-test.fma.llm-d.ai/isc-annotation": "test-value"})

    def spec_yaml(self) -> bytes:
        """``yaml.Marshal(isc.Spec.ModelServerConfig)``: JSON field names, omitempty, keys sorted."""
        spec: dict[str, Any] = {"port": self.port, "options": self.options, "env_vars": self.env_vars,
                                "labels": self.labels, "annotations": self.annotations}  # fmt: skip
        return str(yaml.safe_dump({key: value for key, value in spec.items() if value}, sort_keys=True)).encode()


def configure(isc: ISC, gpus: list[str]) -> tuple[dict[str, Any], str]:
    """``configInferenceServer``: the create body (``VllmConfig``) and the instance id."""
    config: dict[str, Any] = {
        "options": f"{isc.options} --port {isc.port}",
        "gpu_uuids": gpus,
        "env_vars": isc.env_vars,
        "annotations": {"isc-name": isc.name, "inference-port": str(isc.port)},
    }
    digest = hashlib.sha256(isc.spec_yaml() + b";gpus=" + ",".join(gpus).encode()).digest()
    nominal_hash = "I" + base64.urlsafe_b64encode(digest).decode().rstrip("=") + "i"  # RawURLEncoding
    return {key: value for key, value in config.items() if value}, nominal_hash


def go_json(body: dict[str, Any]) -> bytes:
    """``json.Marshal`` of the Go struct: fields in declaration order, map keys sorted, compact."""
    ordered = {key: dict(sorted(value.items())) if isinstance(value, dict) else value for key, value in body.items()}
    return json.dumps(ordered, separators=(",", ":")).encode()


def _typed(obj: dict[str, Any], key: str, check: Any, what: str) -> None:
    value = obj.get(key)
    assert value is None or check(value), f"Go's decoder fails on {what} {key}={value!r}"


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _string_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(item, str) for item in value.values())


def go_instance_state(obj: Any) -> dict[str, Any]:
    """``InstanceState`` as Go's ``encoding/json`` decodes it (a wrong type fails the call)."""
    assert isinstance(obj, dict), f"Go's decoder fails on an instance state {obj!r}"
    for key in ("instance_id", "status", "options"):
        _typed(obj, key, lambda value: isinstance(value, str), "the instance state's")
    _typed(obj, "gpu_uuids", _strings, "the instance state's")
    for key in ("env_vars", "annotations"):
        _typed(obj, key, _string_map, "the instance state's")
    return obj


def go_all_instances(obj: Any) -> dict[str, Any]:
    """``AllInstancesState``: what ``ListInstances`` returns."""
    assert isinstance(obj, dict), f"Go's decoder fails on a list answer {obj!r}"
    for key in ("total_instances", "running_instances"):
        _typed(obj, key, lambda value: isinstance(value, int) and not isinstance(value, bool), "the list's")
    _typed(obj, "instances", lambda value: isinstance(value, list), "the list's")
    for instance in obj.get("instances") or []:
        go_instance_state(instance)
    return obj


# ----------------------------------------------------------------------------- pods and the node


@functools.cache
def netns_prefix() -> tuple[str, ...] | None:
    """The ``unshare`` command that gives a pod its own network namespace here, or None."""
    if os.environ.get("FMA_REPLAY_SHARED_NETWORK") == "1" or shutil.which("unshare") is None:
        return None
    probe = [sys.executable, "-c", "from tests.fma_pod import loopback_up; loopback_up()"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for prefix in (("unshare", "--user", "--map-root-user", "--net"), ("unshare", "--net")):
        try:
            probed = subprocess.run([*prefix, *probe], check=False, cwd=REPO, env=env, capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probed.returncode == 0:
            return prefix
    return None


class Pod:
    """A launcher pod: ``/app/launcher.py`` as FMA's LauncherConfig and pod-helper.go start it."""

    def __init__(self, name: str, node: Node) -> None:
        self.name = name
        self.bound_to: str | None = None  # the requester annotation (dual-pods.llm-d.ai/requester)
        self.deleted = False
        self.leftovers: list[int] = []
        workdir = node.workdir / name
        for sub in ("logs", "run", "tmp"):
            (workdir / sub).mkdir(parents=True)
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("LAUNCHER_", "VLLM_")) and key not in ("NODE_NAME", "NAMESPACE", "PYTHONPATH")}  # fmt: skip
        env.update({
            # pod-helper.go's requiredEnvVars. PYTHONPATH=/app puts /app/launcher.py ahead of our
            # package: the image installs the package, here it is the checkout's (after /app).
            "PYTHONPATH": os.pathsep.join([str(APP), str(REPO)]),
            "NVIDIA_VISIBLE_DEVICES": "all",
            "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
            "VLLM_SERVER_DEV_MODE": "1",
            # This test's own choices: the stand-in workload and private directories.
            "LAUNCHER_FORKSERVER_WORKLOAD": "standin",
            "LAUNCHER_STOP_TIMEOUT": "2",
            "LAUNCHER_LOG_DIR": str(workdir / "logs"),
            "LAUNCHER_RUNTIME_DIR": str(workdir / "run"),
            "TMPDIR": str(workdir / "tmp"),
        })  # fmt: skip
        launcher = [sys.executable, str(APP / "launcher.py"), "--mock-gpus"]
        listeners: list[socket.socket] = []
        if node.netns is not None:
            # The pod's ports, reached from here as the controller reaches a pod IP.
            pod_ports = (API_PORT, *node.isc_ports)
            listeners = [socket.create_server(("127.0.0.1", 0)) for _ in pod_ports]
            self.ports = {port: listener.getsockname()[1] for port, listener in zip(pod_ports, listeners, strict=True)}
            relays = [f"{listener.fileno()}:{port}" for port, listener in zip(pod_ports, listeners, strict=True)]
            command = [*node.netns, sys.executable, "-m", "tests.fma_pod", *relays, "--", *launcher,
                       "--host", "0.0.0.0", "--port", str(API_PORT), "--log-level", "info"]  # fmt: skip
        else:
            self.ports = {API_PORT: free_port(), **{port: port for port in node.isc_ports}}
            command = [*launcher, "--host", "127.0.0.1", "--port", str(self.ports[API_PORT]), "--log-level", "info"]
        self.output_path = workdir / "pod.out"
        with self.output_path.open("wb") as output:
            self.process = subprocess.Popen(
                command, cwd=APP, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                pass_fds=[listener.fileno() for listener in listeners],
            )  # fmt: skip
        for listener in listeners:
            listener.close()  # the pod holds them now
        try:
            # The kubelet: Ready once the readiness probe answers 2xx/3xx; the liveness probe too.
            wait_until(lambda: self._probe("/v2/vllm/instances"), 60, 0.05, f"pod {name}'s readiness probe")
            wait_until(lambda: self._probe("/health"), 60, 0.05, f"pod {name}'s liveness probe")
        except BaseException:
            self.delete()
            raise

    def _probe(self, path: str) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"pod {self.name} exited with {self.process.returncode}:\n{self.output()}")
        with contextlib.suppress(httpx.TransportError):
            return 200 <= httpx.get(self.url(API_PORT) + path, timeout=1).status_code < 400
        return False

    def url(self, port: int) -> str:
        """``http://<pod IP>:<port>`` as seen from the controller."""
        return f"http://127.0.0.1:{self.ports[port]}"

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def processes(self) -> list[psutil.Process]:
        """The pod's processes: its container (and relays), the launcher, forkserver, instances."""
        try:
            top = psutil.Process(self.process.pid)
            return [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def delete(self) -> list[int]:
        """``kubectl delete pod``: SIGTERM, SIGKILL after the grace period; the pids that outlived it."""
        if self.deleted:
            return self.leftovers
        self.deleted = True
        tree = self.processes()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _, alive = psutil.wait_procs(tree, timeout=10)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self.leftovers = [process.pid for process in alive]
        return self.leftovers


class Node:
    """One Kubernetes node: its launcher pods and the namespace's ISCs."""

    def __init__(self) -> None:
        self.netns = netns_prefix()
        self.workdir = Path(tempfile.mkdtemp(prefix="fma-replay-"))
        # FMA's ports in a pod of its own; free ports of this host where pods share it.
        ports = (8005, 8006, 8007, 8008) if self.netns is not None else tuple(free_port() for _ in range(4))
        self.iscs = {
            SMOL: ISC(SMOL, ports[0], "--model HuggingFaceTB/SmolLM2-360M-Instruct"),
            QWEN: ISC(QWEN, ports[1], "--model Qwen/Qwen2.5-0.5B-Instruct"),
            TINY: ISC(TINY, ports[2], "--model TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
        }
        self.isc_ports = ports
        self.broken_port = ports[3]
        self.pods: list[Pod] = []

    def start_pod(self) -> Pod:
        """A new launcher pod (``A``, ``B``, ...), once Ready."""
        pod = Pod("ABCDEFGH"[len(self.pods)], self)
        self.pods.append(pod)
        return pod

    def live_pods(self) -> list[Pod]:
        return [pod for pod in self.pods if not pod.deleted]

    def close(self) -> None:
        outputs = {pod.name: pod.output() for pod in self.pods}
        leftovers = {pod.name: pod.delete() for pod in self.pods}
        shutil.rmtree(self.workdir, ignore_errors=True)
        assert not any(leftovers.values()), f"processes outlived their pods: {leftovers}\n{outputs}"


# ----------------------------------------------------------------------------- the controller


@dataclass
class Call:
    """One HTTP call of the controller: ``A GET /v2/vllm/instances 200``, ``A:8005 POST /sleep 200``."""

    where: str
    method: str
    path: str
    status: int | None  # None: no HTTP answer (refused, reset)
    answer: Any = None

    def __str__(self) -> str:
        return f"{self.where} {self.method} {self.path} {self.status or 'ERR'}"


class ControllerError(Exception):
    """What ``doHTTP`` turns into an error: no answer, or a status outside 200-299."""

    def __init__(self, call: Call, text: str = "") -> None:
        super().__init__(f"{call}: {text[:300]}")
        self.status = call.status


@dataclass
class Server:
    """The controller's serverData for one server-requesting pod."""

    requester: str
    isc_name: str
    gpus: list[str]
    pod: Pod | None = None
    instance_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    port: int = 0
    known_to_exist: bool = False  # InstanceKnownToExist
    sleeping: bool | None = None
    needed_new_launcher: bool = False
    needed_new_instance: bool = False
    instances_deleted: set[str] = field(default_factory=set)
    requester_deleted: bool = False


class Controller:
    """The dual-pods controller's dealings with launchers (inference-server.go), one process's memory."""

    def __init__(self, node: Node, calls: list[Call] | None = None, http: httpx.Client | None = None) -> None:
        self.node = node
        self.servers: dict[str, Server] = {}
        self.last_used: dict[str, dict[str, float]] = {}  # nodeDat.Launchers[pod].Instances
        self.calls = calls if calls is not None else []
        if http is None:
            # myHTTPClient: a 30 s timeout. A fresh connection per call keeps the relays simple.
            http = httpx.Client(timeout=30.0, limits=httpx.Limits(max_keepalive_connections=0))
            http.headers.clear()
            http.headers.update({"User-Agent": "Go-http-client/1.1", "Accept-Encoding": "gzip"})
        self.http = http

    # -- HTTP, as doHTTP and LauncherClient.fullDo do it

    def _do(self, pod: Pod, port: int, method: str, path: str, body: dict[str, Any] | None = None,
            decode: bool = True) -> Any:  # fmt: skip
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if decode:
            headers["Accept"] = "application/json"
        call = Call(pod.name if port == API_PORT else f"{pod.name}:{port}", method, path, None)
        self.calls.append(call)
        try:
            answer = self.http.request(method, pod.url(port) + path, headers=headers,
                                       content=go_json(body) if body is not None else None)  # fmt: skip
        except httpx.TransportError as exc:
            raise ControllerError(call, repr(exc)) from None
        call.status = answer.status_code
        if not 200 <= answer.status_code < 300:
            raise ControllerError(call, answer.text)
        if decode:
            try:
                call.answer = answer.json()
            except ValueError:
                raise ControllerError(call, f"failed to decode response: {answer.text[:200]!r}") from None
        return call.answer

    def _delete(self, pod: Pod, instance_id: str) -> None:
        """``DeleteInstance``: 404 is fine (``IsInstanceNotFoundError``), another error is raised."""
        try:
            self._do(pod, API_PORT, "DELETE", f"/v2/vllm/instances/{instance_id}")
        except ControllerError as exc:
            if exc.status != 404:
                raise

    def _query_sleeping(self, pod: Pod, port: int) -> bool:
        answer = self._do(pod, port, "GET", "/is_sleeping")
        assert isinstance(answer, dict), f"Go's decoder fails on /is_sleeping's {answer!r}"
        _typed(answer, "is_sleeping", lambda value: isinstance(value, bool), "/is_sleeping's")
        return bool(answer.get("is_sleeping"))

    # -- syncLauncherInstances

    def sync(self, pod: Pod, instances_deleted: set[str] | None = None) -> tuple[list[dict[str, Any]], set[str]]:
        """List; delete the stopped instances no requester is bound to; remember the others."""
        listing = go_all_instances(self._do(pod, API_PORT, "GET", "/v2/vllm/instances"))
        known = self.last_used.get(pod.name, {})
        bound = {server.instance_id for server in self.servers.values() if server.pod is pod and server.instance_id}
        remaining, stopped_bound, fresh = [], set(), {}
        for instance in listing.get("instances") or []:
            instance_id = instance.get("instance_id", "")
            if instance.get("status") == "stopped":
                if instance_id in bound:
                    stopped_bound.add(instance_id)  # the caller deletes the requester first
                else:
                    if instances_deleted is not None:
                        instances_deleted.add(instance_id)
                    with contextlib.suppress(ControllerError):  # logged, not returned
                        self._delete(pod, instance_id)
                continue
            remaining.append(instance)
            fresh[instance_id] = known.get(instance_id, time.time())
        self.last_used[pod.name] = fresh
        return remaining, stopped_bound

    def launcher_added(self, pod: Pod) -> None:
        """``unboundLauncherPodItem``: the informer told of a launcher pod."""
        with contextlib.suppress(ControllerError):
            self.sync(pod)

    # -- selectOrReclaimLauncherPod

    def _select_or_reclaim(self, target: str, port: int, max_others: int, deleted: set[str]) -> Pod | str | None:
        candidate: Pod | None = None
        some_not_ready = False
        best: tuple[Pod, list[str], tuple[float, str]] | None = None
        for pod in self.node.live_pods():
            if pod.bound_to is not None:
                continue  # bound to another requester
            try:
                instances, _ = self.sync(pod, deleted)
            except ControllerError:
                some_not_ready = True
                continue
            last_used = self.last_used[pod.name]
            sleeper = False
            conflicts: list[str] = []
            others: list[str] = []
            for instance in instances:
                instance_id = instance.get("instance_id", "")
                try:
                    instance_port = int((instance.get("annotations") or {})["inference-port"])
                except (KeyError, ValueError):
                    self._delete(pod, instance_id)  # it reports no usable port
                    deleted.add(instance_id)
                    last_used.pop(instance_id, None)
                    return RETRY
                if instance_id == target:
                    sleeper = sleeper or instance.get("status") != "stopped"
                    continue
                (conflicts if instance_port == port else others).append(instance_id)
            if sleeper:
                return pod  # priority 1: the target instance, to wake
            if not conflicts and len(instances) <= max_others:
                candidate = candidate or pod  # priority 2: room for one more
                continue
            limit = max(len(instances) - max_others, 1) - len(conflicts)
            lru = sorted(others, key=lambda instance_id: (last_used.get(instance_id, 0.0), instance_id))
            victims = conflicts + (lru[:limit] if limit > 0 else [])
            oldest = min((last_used.get(victim, 0.0), victim) for victim in victims)
            # compareReclaimPlans: more victims first, then the least recently used.
            if best is None or (-len(victims), oldest) < (-len(best[1]), best[2]):
                best = (pod, victims, oldest)
        if candidate is not None:
            return candidate
        if best is not None:
            pod, victims, _ = best
            for victim in victims:  # priority 3: reclaim room
                deleted.add(victim)
                self._delete(pod, victim)
                self.last_used[pod.name].pop(victim, None)
            return pod
        return RETRY if some_not_ready else None

    # -- infSvrItem.process, launcher-based

    def process(self, requester: str) -> str:
        """One pass over a server-requesting pod; READY, REQUESTER_DELETED, AGAIN or RETRY."""
        server = self.servers[requester]
        try:
            return self._process(server)
        except ControllerError:
            return RETRY

    def _process(self, server: Server) -> str:
        if server.pod is None:
            isc = self.node.iscs[server.isc_name]
            config, instance_id = configure(isc, server.gpus)  # computeDesiredInstanceState
            chosen = self._select_or_reclaim(instance_id, isc.port, MAX_INSTANCES - 1, server.instances_deleted)
            if chosen == RETRY:
                return RETRY
            pod = chosen if isinstance(chosen, Pod) else self.node.start_pod()  # else a new launcher pod, bound
            server.needed_new_launcher = not isinstance(chosen, Pod)
            pod.bound_to, server.pod, server.sleeping = server.requester, pod, None
            server.instance_id, server.config, server.port = instance_id, config, isc.port  # commitInstanceState
            return AGAIN  # bind first; the pod's update brings the requester back
        pod = server.pod
        instances, stopped_bound = self.sync(pod, server.instances_deleted)
        present = any(instance.get("instance_id") == server.instance_id for instance in instances)
        stopped = server.instance_id in stopped_bound
        if stopped or not present:
            if stopped or server.known_to_exist:
                server.sleeping = True  # so that unbinding does not POST /sleep to a dead instance
                self._requester_deleted(server)
                return REQUESTER_DELETED
            server.needed_new_instance = True
            self._do(pod, API_PORT, "PUT", f"/v2/vllm/instances/{server.instance_id}", server.config)
            server.known_to_exist = True
            self.last_used.setdefault(pod.name, {})[server.instance_id] = time.time()
        server.known_to_exist = True
        if server.sleeping is None:
            server.sleeping = self._query_sleeping(pod, server.port)  # on error: again after 5 s
        if server.sleeping:
            self._do(pod, server.port, "POST", "/wake_up", decode=False)
            server.sleeping = False
        return READY  # readiness relayed to the requester: not sleeping

    def _requester_deleted(self, server: Server) -> None:
        """The requester pod deleted by the controller, then unbound (no call: sleeping is True)."""
        server.requester_deleted = True
        self._unbind(server)

    def _unbind(self, server: Server) -> None:
        if server.pod is not None:
            server.pod.bound_to = None
        del self.servers[server.requester]  # clearServerData, once both pods are gone or unbound

    def serve(self, requester: str, isc_name: str, gpus: list[str], deadline: float = 20.0) -> Server:
        """A server-requesting pod appears: process it until it is served or deleted."""
        server = self.servers.setdefault(requester, Server(requester, isc_name, list(gpus)))
        end = time.monotonic() + deadline
        last: ControllerError | None = None
        while True:
            try:
                outcome = self._process(server)
            except ControllerError as exc:
                outcome, last = RETRY, exc
            if outcome in (READY, REQUESTER_DELETED):
                return server
            if time.monotonic() > end:
                raise AssertionError(f"{requester} not served in {deadline:.0f} s; the last error: {last}")
            if outcome == RETRY:
                time.sleep(RETRY_SECONDS)

    # -- ensureUnbound and maybeDeleteObsoleteInstance

    def release(self, requester: str, deadline: float = 20.0) -> None:
        """The server-requesting pod goes away (the ReplicaSet scaled to 0): unbind its launcher."""
        server = self.servers[requester]
        wait_until(lambda: self._try_unbind(server), deadline, RETRY_SECONDS, f"{requester} unbound")

    def _try_unbind(self, server: Server) -> bool:
        assert server.pod is not None
        if not server.sleeping:
            try:
                if self._maybe_delete_obsolete(server):
                    server.sleeping = True
                else:
                    self._do(server.pod, server.port, "POST", "/sleep", decode=False)
                    server.sleeping = True
            except ControllerError:
                return False
        self._unbind(server)
        return True

    def _maybe_delete_obsolete(self, server: Server) -> bool:
        """True if the instance is gone now (deleted here as obsolete, or not found)."""
        assert server.pod is not None
        try:
            state = go_instance_state(self._do(server.pod, API_PORT, "GET", f"/v2/vllm/instances/{server.instance_id}"))
        except ControllerError as exc:
            return exc.status == 404
        isc = self.node.iscs.get((state.get("annotations") or {}).get("isc-name", ""))
        if isc is None or not state.get("gpu_uuids"):
            return False
        if configure(isc, state["gpu_uuids"])[1] == server.instance_id:
            return False  # not obsolete
        server.instances_deleted.add(server.instance_id)
        try:
            self._delete(server.pod, server.instance_id)
        except ControllerError:
            return False
        self.last_used.get(server.pod.name, {}).pop(server.instance_id, None)
        return True

    # -- an ISC changes: instanceGCItem, then the requesters using it

    def update_isc(self, isc: ISC) -> None:
        """``kubectl patch inferenceserverconfig``: the GC of its obsolete sleeping instances, then its requesters."""
        self.node.iscs[isc.name] = isc
        for pod_name in list(self.last_used):
            pod = next(pod for pod in self.node.pods if pod.name == pod_name)
            if pod.deleted:
                continue
            try:
                listing = go_all_instances(self._do(pod, API_PORT, "GET", "/v2/vllm/instances"))
            except ControllerError:
                continue
            for instance in listing.get("instances") or []:
                annotations = instance.get("annotations") or {}
                if annotations.get("isc-name") != isc.name or not instance.get("gpu_uuids"):
                    continue
                if configure(isc, instance["gpu_uuids"])[1] == instance.get("instance_id"):
                    continue
                try:
                    port = int(annotations["inference-port"])
                    if not self._query_sleeping(pod, port):
                        continue  # not explicitly sleeping
                    self._do(pod, API_PORT, "DELETE", f"/v2/vllm/instances/{instance['instance_id']}")
                except (KeyError, ValueError, ControllerError):
                    continue  # logged (a 404 too)
                self.last_used[pod_name].pop(instance["instance_id"], None)
        for server in list(self.servers.values()):
            if server.isc_name == isc.name:
                self.process(server.requester)

    def launcher_deleted(self, pod: Pod) -> None:
        """The informer told of a deleted launcher pod: clearLauncherData."""
        self.last_used.pop(pod.name, None)

    def restarted(self) -> Controller:
        """The controller's pod replaced: nothing in memory; the informers list every pod again."""
        fresh = Controller(self.node, self.calls, self.http)
        for pod in self.node.live_pods():
            if pod.bound_to is None:
                fresh.launcher_added(pod)
        return fresh

    # -- what the cases assert

    def mark(self) -> int:
        return len(self.calls)

    def changes_since(self, mark: int) -> list[str]:
        """The calls that change something (PUT, DELETE, POST), in order."""
        return [str(call) for call in self.calls[mark:] if call.method != "GET"]

    def calls_on(self, pod: Pod, mark: int) -> list[str]:
        return [str(call) for call in self.calls[mark:] if call.where.split(":")[0] == pod.name]


# ----------------------------------------------------------------------------- fixtures and helpers


ALLOWED = {("GET", "/v2/vllm/instances"), ("GET", "/v2/vllm/instances/ID"), ("PUT", "/v2/vllm/instances/ID"),
           ("DELETE", "/v2/vllm/instances/ID"), ("GET", "/is_sleeping"), ("POST", "/sleep"), ("POST", "/wake_up")}  # fmt: skip


@pytest.fixture
def node() -> Iterator[Node]:
    """A node with no launcher pod yet; on the way out every pod is deleted and checked gone."""
    cluster = Node()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def ctl(node: Node) -> Iterator[Controller]:
    controller = Controller(node)
    yield controller
    controller.http.close()
    used = {(call.method, "/v2/vllm/instances/ID" if call.path.count("/") == 4 else call.path)
            for call in controller.calls}  # fmt: skip
    assert used <= ALLOWED, f"the replay made calls the controller never makes: {used - ALLOWED}"
    reads = [call for call in controller.calls if call.method == "GET" and call.where.find(":") < 0]
    assert all(call.status in (200, 404) for call in reads), [str(call) for call in reads]


def observe(pod: Pod, port: int = API_PORT, path: str = "/v2/vllm/instances") -> Any:
    """What the test looks at itself (kubectl exec ... urllib in the e2e): not a controller call."""
    answer = httpx.get(pod.url(port) + path, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def listing(pod: Pod) -> dict[str, dict[str, Any]]:
    return {instance["instance_id"]: instance for instance in observe(pod)["instances"]}


def is_sleeping(pod: Pod, port: int) -> bool:
    return bool(observe(pod, port, "/is_sleeping")["is_sleeping"])


def instance_id(node: Node, isc_name: str, gpus: list[str] = GPU) -> str:
    return configure(node.iscs[isc_name], gpus)[1]


def populated(node: Node, ctl: Controller) -> Pod:
    """The launcher-populator's one launcher pod on the node (LauncherPopulationPolicy count 1)."""
    pod = node.start_pod()
    ctl.launcher_added(pod)
    return pod


def served_then_released(ctl: Controller, requester: str, isc_name: str) -> Server:
    server = ctl.serve(requester, isc_name, GPU)
    ctl.release(requester)
    return server


# ----------------------------------------------------------------------------- the e2e cases


def test_basic_launcher_pod_creation(node: Node, ctl: Controller) -> None:
    pod = populated(node, ctl)
    smol = instance_id(node, SMOL)
    mark = ctl.mark()
    server = ctl.serve("req1", SMOL, GPU)
    assert server.pod is pod and not server.needed_new_launcher and server.needed_new_instance
    assert ctl.changes_since(mark) == [f"A PUT /v2/vllm/instances/{smol} 201"]
    put = next(call for call in ctl.calls if call.method == "PUT")
    assert put.answer["instance_id"] == smol and isinstance(put.answer["status"], str)
    assert len(smol) == 45 and smol[0] == "I" and smol[-1] == "i"  # FMA's form of the id
    state = listing(pod)[smol]
    assert state["status"] == "running" and state["gpu_uuids"] == GPU
    assert state["annotations"] == {"isc-name": SMOL, "inference-port": str(node.iscs[SMOL].port)}
    assert state["options"] == f"--model HuggingFaceTB/SmolLM2-360M-Instruct --port {node.iscs[SMOL].port}"
    assert not is_sleeping(pod, node.iscs[SMOL].port)
    assert [call.status for call in ctl.calls if call.path == "/is_sleeping"][-1] == 200


def test_a_create_whose_answer_was_lost_and_the_codes_the_controller_branches_on(node: Node, ctl: Controller) -> None:
    # A PUT that took effect but whose answer never came (the Go client gives up after 30 s): the
    # controller retries the item, and any 2xx, 200 or 201, would have been success to it.
    pod = populated(node, ctl)
    config, smol = configure(node.iscs[SMOL], GPU)
    mark = ctl.mark()
    ctl._do(pod, API_PORT, "PUT", f"/v2/vllm/instances/{smol}", config)  # the answer it never saw
    with pytest.raises(ControllerError) as stale:  # a retry on a stale snapshot: a create error, retried
        ctl._do(pod, API_PORT, "PUT", f"/v2/vllm/instances/{smol}", config)
    assert stale.value.status == 409  # as FMA's launcher: "Instance with ID ... already exists"
    server = ctl.serve("req1", SMOL, GPU)  # its next pass lists first: present, so no PUT
    assert server.pod is pod and server.known_to_exist and not server.sleeping
    assert ctl.changes_since(mark) == [f"A PUT /v2/vllm/instances/{smol} 201", f"A PUT /v2/vllm/instances/{smol} 409"]
    # 404 is the only code it tells apart: a DELETE or GET of an instance that is gone.
    mark = ctl.mark()
    ctl._delete(pod, "Imissingi")  # IsInstanceNotFoundError: already absent, fine
    missing = Server("gone", SMOL, GPU, pod=pod, instance_id="Imissingi")
    assert ctl._maybe_delete_obsolete(missing)  # "Now vLLM instance does not exist"
    assert [str(call) for call in ctl.calls[mark:]] == [
        "A DELETE /v2/vllm/instances/Imissingi 404",
        "A GET /v2/vllm/instances/Imissingi 404",
    ]


def test_same_node_port_collision_creates_a_new_launcher(node: Node, ctl: Controller) -> None:
    if node.netns is None:
        pytest.skip("needs a network namespace per launcher pod (unshare): two pods, one port")
    first = populated(node, ctl)
    ctl.serve("req1", SMOL, GPU)
    mark = ctl.mark()
    collision = ctl.serve("collision", SMOL, ["GPU-1"])
    second = collision.pod
    assert second is not None and second is not first and collision.needed_new_launcher
    other = instance_id(node, SMOL, ["GPU-1"])
    assert collision.instance_id == other != instance_id(node, SMOL)
    assert ctl.changes_since(mark) == [f"B PUT /v2/vllm/instances/{other} 201"]
    assert ctl.calls_on(first, mark) == []  # bound to req1: not even listed
    port = node.iscs[SMOL].port
    assert listing(second)[other]["gpu_uuids"] == ["GPU-1"] and listing(second)[other]["status"] == "running"
    assert not is_sleeping(first, port) and not is_sleeping(second, port)  # one port, two pods
    mark = ctl.mark()
    ctl.release("collision")
    assert ctl.changes_since(mark) == [f"B:{port} POST /sleep 200"]
    assert second.delete() == []  # kubectl delete pod: nothing of it is left
    ctl.launcher_deleted(second)
    assert listing(first)[instance_id(node, SMOL)]["status"] == "running" and not is_sleeping(first, port)


def test_instance_wake_up_fast_path(node: Node, ctl: Controller) -> None:
    pod = populated(node, ctl)
    smol, port = instance_id(node, SMOL), node.iscs[SMOL].port
    ctl.serve("req1", SMOL, GPU)
    pid = listing(pod)[smol]["pid"]
    mark = ctl.mark()
    ctl.release("req1")
    assert ctl.changes_since(mark) == [f"A:{port} POST /sleep 200"]
    assert f"A GET /v2/vllm/instances/{smol} 200" in ctl.calls_on(pod, mark)  # obsolete? no
    assert is_sleeping(pod, port)
    mark = ctl.mark()
    server = ctl.serve("req2", SMOL, GPU)
    assert server.pod is pod and not server.needed_new_instance
    assert ctl.changes_since(mark) == [f"A:{port} POST /wake_up 200"]
    assert not is_sleeping(pod, port) and listing(pod)[smol]["pid"] == pid  # the same process, woken


def test_multiple_instances_share_one_launcher(node: Node, ctl: Controller) -> None:
    pod = populated(node, ctl)
    served_then_released(ctl, "req2", SMOL)
    mark = ctl.mark()
    server = ctl.serve("req3", QWEN, GPU)
    qwen = instance_id(node, QWEN)
    assert server.pod is pod and ctl.changes_since(mark) == [f"A PUT /v2/vllm/instances/{qwen} 201"]
    instances = listing(pod)
    assert sorted(instances) == sorted([instance_id(node, SMOL), qwen])
    assert all(state["status"] == "running" and state["gpu_uuids"] == GPU for state in instances.values())
    assert observe(pod)["total_instances"] == 2
    assert is_sleeping(pod, node.iscs[SMOL].port) and not is_sleeping(pod, node.iscs[QWEN].port)


def test_switch_instances_in_one_launcher(node: Node, ctl: Controller) -> None:
    pod = populated(node, ctl)
    served_then_released(ctl, "req2", SMOL)
    served_then_released(ctl, "req3", QWEN)
    mark = ctl.mark()
    server = ctl.serve("req4", SMOL, GPU)
    assert server.pod is pod and ctl.changes_since(mark) == [f"A:{node.iscs[SMOL].port} POST /wake_up 200"]
    assert not is_sleeping(pod, node.iscs[SMOL].port) and is_sleeping(pod, node.iscs[QWEN].port)
    assert observe(pod)["total_instances"] == 2


def test_per_launcher_instance_cap_deletes_the_lru_instance(node: Node, ctl: Controller) -> None:
    pod = populated(node, ctl)
    served_then_released(ctl, "req2", SMOL)
    served_then_released(ctl, "req3", QWEN)
    served_then_released(ctl, "req4", SMOL)  # woken and put back: its last use is still its creation
    assert observe(pod)["total_instances"] == MAX_INSTANCES
    smol, tiny = instance_id(node, SMOL), instance_id(node, TINY)
    mark = ctl.mark()
    server = ctl.serve("req5", TINY, GPU)
    assert server.pod is pod and len(node.pods) == 1  # room reclaimed, no new launcher
    assert ctl.changes_since(mark) == [
        f"A DELETE /v2/vllm/instances/{smol} 200",
        f"A PUT /v2/vllm/instances/{tiny} 201",
    ]
    assert sorted(listing(pod)) == sorted([instance_id(node, QWEN), tiny])
    assert httpx.get(pod.url(API_PORT) + f"/v2/vllm/instances/{smol}").status_code == 404
    assert is_sleeping(pod, node.iscs[QWEN].port) and not is_sleeping(pod, node.iscs[TINY].port)


def _after_the_cap(node: Node, ctl: Controller) -> Pod:
    """The e2e's inventory after the cap case: qwen asleep, tiny awake (bound to req5)."""
    pod = populated(node, ctl)
    served_then_released(ctl, "req2", SMOL)
    served_then_released(ctl, "req3", QWEN)
    served_then_released(ctl, "req4", SMOL)
    ctl.serve("req5", TINY, GPU)
    assert sorted(listing(pod)) == sorted([instance_id(node, QWEN), instance_id(node, TINY)])
    return pod


def test_controller_restart_relists_and_rebinds(node: Node, ctl: Controller) -> None:
    pod = _after_the_cap(node, ctl)
    ctl.release("req5")
    before = observe(pod)["total_instances"]
    mark = ctl.mark()
    restarted = ctl.restarted()
    assert ctl.calls_on(pod, mark) == ["A GET /v2/vllm/instances 200"]  # the informer's initial list
    assert observe(pod)["total_instances"] == before == 2
    mark = ctl.mark()
    server = restarted.serve("req-post-restart", QWEN, GPU)
    assert server.pod is pod and not server.needed_new_instance
    assert restarted.changes_since(mark) == [f"A:{node.iscs[QWEN].port} POST /wake_up 200"]
    assert observe(pod)["total_instances"] == 2 and not is_sleeping(pod, node.iscs[QWEN].port)


def test_obsolete_sleeping_instance_deleted_after_isc_update(node: Node, ctl: Controller) -> None:
    pod = _after_the_cap(node, ctl)
    ctl.release("req5")
    ctl.serve("req-post-restart", QWEN, GPU)  # qwen awake and bound, tiny asleep
    tiny = node.iscs[TINY]
    mark = ctl.mark()
    ctl.update_isc(replace(tiny, options=tiny.options + " --served-model-name obsolete-after-update"))
    assert ctl.changes_since(mark) == [f"A DELETE /v2/vllm/instances/{configure(tiny, GPU)[1]} 200"]
    assert f"A:{tiny.port} GET /is_sleeping 200" in ctl.calls_on(pod, mark)
    assert sorted(listing(pod)) == [instance_id(node, QWEN)] and not is_sleeping(pod, node.iscs[QWEN].port)


def test_obsolete_awake_instance_deleted_on_unbinding(node: Node, ctl: Controller) -> None:
    pod = populated(node, ctl)
    qwen = node.iscs[QWEN]
    ctl.serve("req-post-restart", QWEN, GPU)
    mark = ctl.mark()
    ctl.update_isc(replace(qwen, options=qwen.options + " --served-model-name obsolete-awake-unbind"))
    assert ctl.changes_since(mark) == []  # awake: the GC leaves it
    assert f"A:{qwen.port} GET /is_sleeping 200" in ctl.calls_on(pod, mark)
    mark = ctl.mark()
    ctl.release("req-post-restart")
    assert ctl.changes_since(mark) == [f"A DELETE /v2/vllm/instances/{configure(qwen, GPU)[1]} 200"]  # no /sleep
    assert observe(pod)["total_instances"] == 0


def test_unbound_launcher_deletion_cleanup(node: Node, ctl: Controller) -> None:
    first = populated(node, ctl)
    served_then_released(ctl, "req1", SMOL)
    assert first.delete() == []  # its sleeping instance goes with it
    ctl.launcher_deleted(first)
    mark = ctl.mark()
    server = ctl.serve("req-after-delete", SMOL, GPU)
    assert server.pod is not first and server.needed_new_launcher
    assert ctl.changes_since(mark) == [f"B PUT /v2/vllm/instances/{instance_id(node, SMOL)} 201"]


def test_stopped_instance_recovery_after_the_instance_is_deleted(node: Node, ctl: Controller) -> None:
    # The e2e's own way: the running instance deleted behind the controller's back.
    pod = populated(node, ctl)
    smol = instance_id(node, SMOL)
    ctl.serve("req-after-delete", SMOL, GPU)
    old_pid = listing(pod)[smol]["pid"]
    assert httpx.delete(pod.url(API_PORT) + f"/v2/vllm/instances/{smol}", timeout=30).status_code == 200
    mark = ctl.mark()
    assert ctl.process("req-after-delete") == REQUESTER_DELETED  # known to exist, now absent
    assert ctl.changes_since(mark) == []
    mark = ctl.mark()
    server = ctl.serve("req-recovered", SMOL, GPU)
    assert server.pod is pod and ctl.changes_since(mark) == [f"A PUT /v2/vllm/instances/{smol} 201"]
    assert listing(pod)[smol]["status"] == "running" and listing(pod)[smol]["pid"] != old_pid


def test_stopped_instance_recovery_after_the_instance_crashed(node: Node, ctl: Controller) -> None:
    pod = populated(node, ctl)
    smol = instance_id(node, SMOL)
    ctl.serve("req-after-delete", SMOL, GPU)
    pid = listing(pod)[smol]["pid"]
    assert pid in [process.pid for process in pod.processes()]  # this test's own process
    os.kill(pid, signal.SIGKILL)
    mark = ctl.mark()
    # Each notifier PATCH brings the requester back: running until the launcher has seen it end.
    wait_until(lambda: ctl.process("req-after-delete") == REQUESTER_DELETED, 20, RETRY_SECONDS, "the requester deleted")
    assert ctl.changes_since(mark) == []  # the stopped instance stays until a later sync
    assert listing(pod)[smol]["status"] == "stopped"
    mark = ctl.mark()
    server = ctl.serve("req-recovered", SMOL, GPU)
    assert server.pod is pod
    assert ctl.changes_since(mark) == [
        f"A DELETE /v2/vllm/instances/{smol} 200",
        f"A PUT /v2/vllm/instances/{smol} 201",
    ]
    assert listing(pod)[smol]["status"] == "running" and listing(pod)[smol]["pid"] != pid


@pytest.mark.parametrize(
    "bad",
    [
        "--fail-at-start",  # starts, then fails (as vLLM short of memory for its KV cache)
        "--no-such-flag",  # vLLM's parser rejects these: under FMA's entry, 201 and then stopped
        "--tensor-parallel-size two",
    ],
)
def test_options_that_cannot_start_stop_the_instance_then_a_fixed_config_serves(
    node: Node, ctl: Controller, bad: str
) -> None:
    # FMA's launcher forks whatever it is given: vLLM's parser fails in the child, the instance
    # stops, the controller deletes the requester; once the ISC is fixed, a new instance serves.
    # (Our launcher's own entry answers the parser's error with a 400 before forking: a create error
    # the controller would retry for ever. FMA's entry forks, as FMA's launcher does.)
    pod = populated(node, ctl)
    fixed = ISC(BROKEN, node.broken_port, "--model HuggingFaceTB/SmolLM2-360M-Instruct")
    broken = replace(fixed, options=f"{fixed.options} {bad}")
    node.iscs[BROKEN] = broken
    broken_id, fixed_id = configure(broken, GPU)[1], configure(fixed, GPU)[1]
    mark = ctl.mark()
    server = ctl.serve("req-broken", BROKEN, GPU, deadline=5)
    assert server.requester_deleted and ctl.changes_since(mark) == [f"A PUT /v2/vllm/instances/{broken_id} 201"]
    state = listing(pod)[broken_id]
    assert state["status"] == "stopped"
    assert isinstance(state["exit_code"], int) and state["exit_code"] != 0
    assert isinstance(state["stop_reason"], str) and state["stop_reason"]
    mark = ctl.mark()
    ctl.update_isc(fixed)  # the GC asks the stopped instance whether it sleeps: no answer, left alone
    assert ctl.changes_since(mark) == []
    mark = ctl.mark()
    server = ctl.serve("req-fixed", BROKEN, GPU)
    assert ctl.changes_since(mark) == [f"A DELETE /v2/vllm/instances/{broken_id} 200",
                                       f"A PUT /v2/vllm/instances/{fixed_id} 201"]  # fmt: skip
    assert listing(pod).keys() == {fixed_id} and listing(pod)[fixed_id]["status"] == "running"
