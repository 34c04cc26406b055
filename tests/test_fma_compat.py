"""Drop-in for llm-d FMA's launcher: its documented request and response shapes, its mock GPU map,
``/app/launcher.py`` with upstream's flags, and the pod notifier's annotation contract.

The shapes come from FMA's ``docs/launcher.md`` (create, get, list, delete, delete-all, logs,
watch, health). Where the seed document (our contract) differs, the seed's word wins and FMA's
fields are added: create says ``"started"``, delete ``"terminated"``. The Kubernetes API is a local
HTTP server that answers the ConfigMap read and records the notifier's PATCHes (no cluster here).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import yaml

from launcher.fma.pod_notifier import ANNOTATION, signature
from tests.launcher_process import REPO, LauncherProcess, free_port, wait_until

APP = REPO / "deploy" / "fma" / "app"
GPU_MAP = {"node-a": json.dumps({"GPU-aaaa": 0, "GPU-bbbb": 1}), "node-b": json.dumps({"GPU-cccc": 1, "GPU-dddd": 0})}


@pytest.fixture(scope="module")
def launcher() -> Iterator[LauncherProcess]:
    process = LauncherProcess(workload="standin", env={"LAUNCHER_MOCK_GPUS": "1", "LAUNCHER_STOP_TIMEOUT": "2"})
    yield process
    assert not process.stop()


def _options(port: int) -> str:
    return f"--model facebook/opt-125m --port {port} --host 127.0.0.1"


def test_every_endpoint_answers_in_fmas_documented_shapes(launcher: LauncherProcess) -> None:
    client = launcher.client
    assert client.get("/health").json() == {"status": "OK"}
    assert {"create_instance", "get_instance_status", "watch_instances"} <= set(client.get("/").json()["endpoints"])

    # POST (auto id), with the request body of FMA's docs.
    body = {"options": _options(free_port()), "gpu_uuids": ["GPU-1"], "env_vars": {"VAR_NAME": "value"}}
    created = client.post("/v2/vllm/instances", json=body)
    assert created.status_code == 201
    state = created.json()
    uuid.UUID(state["instance_id"])
    assert state["status"] == "started"  # the seed's word; FMA's client reads only status and instance_id
    # As FMA's launcher: env_vars echoed with the CUDA_VISIBLE_DEVICES that gpu_uuids mean.
    assert {key: state[key] for key in ("options", "gpu_uuids")} == {key: body[key] for key in ("options", "gpu_uuids")}
    assert state["env_vars"] == {"VAR_NAME": "value", "CUDA_VISIBLE_DEVICES": "1"}
    assert isinstance(state["revision"], int) and state["revision"] >= 1
    auto_id = state["instance_id"]

    # PUT (custom id), annotations as the dual-pods controller sets them.
    annotations = {"isc-name": "my-isc", "inference-port": "8005"}
    put = client.put("/v2/vllm/instances/isc-1", json={"options": _options(free_port()), "annotations": annotations})
    assert put.status_code == 201 and put.json()["annotations"] == annotations
    assert put.json()["revision"] > state["revision"]
    again = client.put("/v2/vllm/instances/isc-1", json={"options": _options(free_port())})
    assert again.status_code == 409 and "detail" in again.json()

    # GET one: the fields FMA's LauncherClient decodes.
    one = client.get("/v2/vllm/instances/isc-1").json()
    assert one["instance_id"] == "isc-1" and one["status"] == "running" and one["annotations"] == annotations
    assert one["options"].startswith("--model facebook/opt-125m")
    assert client.get("/v2/vllm/instances/nope").status_code == 404

    # List, with and without detail.
    listing = client.get("/v2/vllm/instances").json()
    assert {"revision", "total_instances", "running_instances", "instances"} <= set(listing)
    assert listing["total_instances"] == listing["running_instances"] == 2
    ids = client.get("/v2/vllm/instances", params={"detail": "False"}).json()
    assert sorted(ids["instance_ids"]) == sorted([auto_id, "isc-1"]) and ids["count"] == 2

    # Logs: Range answers, with Accept-Ranges on 200 and 206.
    wait_until(lambda: client.get("/v2/vllm/instances/isc-1/log").content, 20, what="a log line")
    whole = client.get("/v2/vllm/instances/isc-1/log")
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    part = client.get("/v2/vllm/instances/isc-1/log", headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.headers["accept-ranges"] == "bytes"
    assert part.headers["content-range"] == f"bytes 0-9/{len(whole.content)}" and part.content == whole.content[:10]

    # Watch from a revision: NDJSON events with the state objects.
    with client.stream("GET", "/v2/vllm/instances/watch", params={"since": str(state["revision"] - 1)}) as stream:
        first = json.loads(next(line for line in stream.iter_lines() if line))
    assert first["type"] == "CREATED" and first["object"]["instance_id"] == auto_id

    # DELETE one: the seed's status, FMA's fields, a newer revision.
    deleted = client.delete(f"/v2/vllm/instances/{auto_id}").json()
    assert deleted["status"] == "terminated" and deleted["instance_id"] == auto_id
    assert deleted["options"] == body["options"] and deleted["gpu_uuids"] == ["GPU-1"]
    assert deleted["revision"] > put.json()["revision"]

    # DELETE all: each item like a single delete.
    everything = client.delete("/v2/vllm/instances").json()
    assert everything["status"] == "all_stopped" and everything["total_stopped"] == 1
    [item] = everything["stopped_instances"]
    assert item["status"] == "terminated" and item["instance_id"] == "isc-1" and item["annotations"] == annotations


def test_unknown_fields_are_ignored_with_a_warning(launcher: LauncherProcess) -> None:
    body = {"options": _options(free_port()), "future_field": {"x": 1}, "another": True}
    answer = launcher.client.put("/v2/vllm/instances/newer", json=body)
    try:  # the module's launcher is shared: a failure here must not leave an instance to the next test
        assert answer.status_code == 201, answer.text
        assert answer.headers["warning"] == '299 - "unknown fields ignored: another, future_field"'
        assert "future_field" not in answer.json()
        wait_until(lambda: "create newer: unknown fields ignored: another, future_field" in launcher.output_text(),
                   10, what="the log line")  # fmt: skip
    finally:
        launcher.client.delete("/v2/vllm/instances/newer")


def test_strict_fields_refuses_unknown_fields() -> None:
    strict = LauncherProcess(workload="standin", env={"LAUNCHER_STRICT_FIELDS": "1"})
    try:
        answer = strict.client.put("/v2/vllm/instances/x", json={"options": "--model m", "future_field": 1})
        assert answer.status_code == 422 and "future_field" in answer.json()["detail"]
    finally:
        assert not strict.stop()


@pytest.mark.parametrize("form", ["file", "configmap-manifest", "mounted-directory"])
def test_mock_gpus_come_from_the_gpu_map_of_this_node(tmp_path: Path, form: str) -> None:
    if form == "file":
        source = tmp_path / "gpu-map.yaml"
        source.write_text(yaml.safe_dump(GPU_MAP))
    elif form == "configmap-manifest":
        source = tmp_path / "gpu-map.yaml"
        source.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "gpu-map"},
                                          "data": GPU_MAP}))  # fmt: skip
    else:
        source = tmp_path / "gpu-map"
        source.mkdir()
        for node, mapping in GPU_MAP.items():
            (source / node).write_text(mapping)
    env = {"LAUNCHER_MOCK_GPUS": "1", "LAUNCHER_GPU_MAP": str(source), "NODE_NAME": "node-b"}
    mapped = LauncherProcess(workload="standin", env=env)
    try:
        gpus = mapped.client.get("/v2/vllm/gpus").json()["gpus"]
        assert [(gpu["index"], gpu["uuid"]) for gpu in gpus] == [(0, "GPU-dddd"), (1, "GPU-cccc")]
        options = _options(free_port()) + " --print-env CUDA_VISIBLE_DEVICES"
        assert mapped.create("g", options=options, gpu_uuids=["GPU-cccc"]).status_code == 201
        wait_until(lambda: b"ENV CUDA_VISIBLE_DEVICES=1" in mapped.client.get("/v2/vllm/instances/g/log").content,
                   20, what="the instance's environment")  # fmt: skip
    finally:
        assert not mapped.stop()


def test_a_bad_gpu_map_stops_the_start_naming_the_node(tmp_path: Path) -> None:
    source = tmp_path / "gpu-map.yaml"
    source.write_text(yaml.safe_dump({"node-a": '{"GPU-aaaa": "zero"}'}))
    result = subprocess.run(
        [sys.executable, "-m", "launcher", "--port", str(free_port()), "--mock-gpus", "--gpu-map", str(source),
         "--node-name", "node-a"],
        cwd=REPO, env={**os.environ, "LAUNCHER_FORKSERVER_WORKLOAD": "standin"}, check=False, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"GPU map {source}, node 'node-a'" in result.stderr


# ---------------------------------------------------------------- a Kubernetes API stand-in


class _FakeKubernetes(BaseHTTPRequestHandler):
    patches: ClassVar[list[dict[str, Any]]] = []
    config_map: ClassVar[dict[str, str]] = GPU_MAP

    def do_GET(self) -> None:
        if self.path.startswith("/api/v1/namespaces/fma/configmaps/gpu-map"):
            self._send({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "gpu-map"},
                        "data": self.config_map})  # fmt: skip
        else:
            self._send({"kind": "Status", "code": 404}, 404)

    def do_PATCH(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.patches.append({"path": self.path, "content_type": self.headers["Content-Type"], "body": body})
        self._send({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "launcher-pod", "namespace": "fma"}})

    def _send(self, payload: dict[str, Any], status: int = 200) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def kubernetes_api(tmp_path: Path) -> Iterator[Path]:
    """A local Kubernetes API stand-in and a kubeconfig pointing at it."""
    _FakeKubernetes.patches = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeKubernetes)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "test", "user": {}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }))  # fmt: skip
    try:
        yield kubeconfig
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def _process(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=APP, env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_app_launcher_py_takes_upstreams_flags_and_reads_the_gpu_map_configmap(
    kubernetes_api: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = {"LAUNCHER_FORKSERVER_WORKLOAD": "standin", "NODE_NAME": "node-a", "NAMESPACE": "fma",
           "KUBECONFIG": str(kubernetes_api), "LAUNCHER_RUNTIME_DIR": str(tmp_path / "run"),
           "LAUNCHER_LOG_DIR": str(tmp_path / "logs"), "TMPDIR": str(tmp_path)}  # fmt: skip
    command = [sys.executable, "launcher.py", "--mock-gpus", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "info"]  # fmt: skip
    with _process(command, env, tmp_path / "launcher.out") as process:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert process.poll() is None, (tmp_path / "launcher.out").read_text()
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{url}/health").status_code == 200
            return False

        wait_until(up, 60, 0.1, "/app/launcher.py to serve")
        gpus = httpx.get(f"{url}/v2/vllm/gpus").json()["gpus"]
        assert [(gpu["index"], gpu["uuid"]) for gpu in gpus] == [(0, "GPU-aaaa"), (1, "GPU-bbbb")]
    # uvicorn re-raises the SIGTERM once it has shut down cleanly.
    assert process.returncode in (0, -15) and "Application shutdown complete" in (tmp_path / "launcher.out").read_text()


def test_the_notifier_publishes_upstreams_signature_on_every_change(
    kubernetes_api: Path, launcher: LauncherProcess, tmp_path: Path
) -> None:
    env = {"POD_NAME": "launcher-pod", "NAMESPACE": "fma", "LAUNCHER_BASE_URL": launcher.base_url,
           "KUBECONFIG": str(kubernetes_api)}  # fmt: skip

    def published() -> list[str]:
        return [patch["body"]["metadata"]["annotations"][ANNOTATION] for patch in _FakeKubernetes.patches]

    left = [item["instance_id"] for item in launcher.client.get("/v2/vllm/instances").json()["instances"]]
    assert left == [], f"an earlier test left instances in the module's launcher: {left}"

    with _process([sys.executable, "launcher_pod_notifier.py"], env, tmp_path / "notifier.out"):
        empty = hashlib.sha256(b"[]").hexdigest()  # upstream's value for a launcher with no instance
        wait_until(lambda: published() == [empty], 30, what="the first PATCH")
        assert launcher.create("n1", options=_options(free_port())).status_code == 201
        wait_until(lambda: len(published()) == 2, 15, what="the PATCH after a create")
        assert published()[-1] == signature([("n1", "running")])
        assert launcher.client.delete("/v2/vllm/instances/n1").status_code == 200
        wait_until(lambda: len(published()) == 3, 15, what="the PATCH after a delete")
        assert published()[-1] == empty
    patch = _FakeKubernetes.patches[0]
    assert patch["path"] == "/api/v1/namespaces/fma/pods/launcher-pod"
    assert patch["content_type"].startswith("application/strategic-merge-patch+json")
    assert patch["body"] == {"metadata": {"annotations": {ANNOTATION: hashlib.sha256(b"[]").hexdigest()}}}


def test_the_signature_is_upstreams() -> None:
    # canonicalize_launcher_state + compute_signature of FMA's launcher_pod_notifier.py, by hand.
    pairs = [("b", "stopped"), ("a", "running")]
    expected = hashlib.sha256(b'[["a","running"],["b","stopped"]]').hexdigest()
    assert signature(pairs) == expected


# ---------------------------------------------------------------- PYTHONPATH=/app

# What the forkserver and its instances import (vLLM's modules are checked in the image: deploy/image_test.sh).
FORKSERVER_MODULES = ["forkserver.__main__", "forkserver.server", "forkserver.child", "forkserver.standin",
                      "forkserver.workload"]  # fmt: skip


@pytest.fixture
def app_copy(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the image's /app, and the environment FMA's controller gives its launcher: PYTHONPATH=/app.
    The package comes after it on the path, as site-packages does in the image."""
    app = tmp_path / "app"
    shutil.copytree(APP, app)
    pythonpath = os.pathsep.join([str(app), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return app, {"PYTHONPATH": pythonpath}


def test_nothing_in_app_shadows_what_the_forkserver_imports(app_copy: tuple[Path, dict[str, str]]) -> None:
    app, env = app_copy
    script = (f"import importlib, json, sys\nfor name in {FORKSERVER_MODULES!r}: importlib.import_module(name)\n"
              f"print(json.dumps({{n: getattr(m, '__file__', None) for n, m in sys.modules.items()}}))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], cwd=app, env={**os.environ, **env}, capture_output=True,
                            text=True, check=True, timeout=60)  # fmt: skip
    files = json.loads(result.stdout)
    assert [name for name, file in files.items() if file and Path(file).is_relative_to(app)] == []
    top_level = {path.stem for path in app.glob("*.py")}
    assert not top_level & {name.split(".")[0] for name in files}, "a module the forkserver imports is in /app"


@pytest.mark.parametrize("command", [["launcher.py"], ["-m", "launcher"]])  # FMA's, and the image's ENTRYPOINT
def test_with_pythonpath_app_the_launcher_and_its_instances_work(
    app_copy: tuple[Path, dict[str, str]], command: list[str]
) -> None:
    app, env = app_copy
    launcher = LauncherProcess(workload="standin", env=env, server=[sys.executable, *command], cwd=app)
    try:
        port = free_port()
        assert launcher.create("in-app", options=_options(port)).status_code == 201
        wait_until(lambda: launcher.state("in-app")["ready"], 20, what="the instance ready")
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        listed = launcher.client.get("/v2/vllm/instances").json()["instances"]
        assert [item["instance_id"] for item in listed] == ["in-app"]
        assert launcher.client.delete("/v2/vllm/instances/in-app").status_code == 200
    finally:
        assert not launcher.stop()
