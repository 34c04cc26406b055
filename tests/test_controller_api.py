"""What a controller relies on: readiness, watch, exit reporting, GPUs, ports, limits.

All through the HTTP API of a real launcher with a real forkserver (stand-in workload).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.launcher_process import LauncherProcess, WatchReader, free_port, wait_until


def _options(port: int | None = None, extra: str = "") -> str:
    port_flag = f"--port {port}" if port is not None else ""
    return f"--model standin-model {port_flag} {extra}".strip()


@pytest.fixture
def watch(standin: LauncherProcess) -> Iterator[WatchReader]:
    reader = WatchReader(standin)
    yield reader
    reader.close()


def test_state_has_identity_timestamps_and_readiness(standin: LauncherProcess) -> None:
    response = standin.create("ready-one", options=_options(free_port(), "--startup-delay 0.3"))
    assert response.status_code == 201
    state = standin.state("ready-one")
    for key in ("created_at", "pid", "model", "port", "ready", "revision"):
        assert state[key] is not None, key
    ready = wait_until(lambda: (s := standin.state("ready-one"))["ready"] and s, 20, what="readiness")
    assert ready["ready_at"] >= ready["created_at"]
    assert ready["start_seconds"] >= 0.3  # the stand-in waited before serving
    assert ready["status"] == "running"


def test_watch_sees_created_ready_deleted_in_revision_order(standin: LauncherProcess, watch: WatchReader) -> None:
    assert watch.status_code == 200
    assert standin.create("watched", options=_options()).status_code == 201
    wait_until(lambda: "READY" in watch.types_for("watched"), 20, what="READY")
    assert standin.client.delete("/v2/vllm/instances/watched").status_code == 200
    wait_until(lambda: "DELETED" in watch.types_for("watched"), 20, what="DELETED")
    assert watch.types_for("watched") == ["CREATED", "READY", "DELETED"]
    revisions = [event["object"]["revision"] for event in watch.events]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    assert standin.client.get("/v2/vllm/instances").json()["revision"] == revisions[-1]


def test_watch_reports_a_crash_as_stopped_with_exit_code(standin: LauncherProcess, watch: WatchReader) -> None:
    assert standin.create("crashy", options=_options(extra="--crash-after 0.3 --exit-code 5")).status_code == 201
    wait_until(lambda: "STOPPED" in watch.types_for("crashy"), 20, what="STOPPED")
    stopped = next(e for e in watch.events if e["type"] == "STOPPED" and e["object"]["instance_id"] == "crashy")
    assert stopped["object"]["exit_code"] == 5
    assert stopped["object"]["stopped_at"] >= stopped["object"]["created_at"]
    assert standin.client.delete("/v2/vllm/instances/crashy").status_code == 200
    wait_until(lambda: "DELETED" in watch.types_for("crashy"), 20, what="DELETED")
    assert watch.types_for("crashy")[0] == "CREATED" and watch.types_for("crashy")[-2:] == ["STOPPED", "DELETED"]


def test_watch_without_since_starts_with_existing_instances(standin: LauncherProcess) -> None:
    for name in ("pre-a", "pre-b"):
        assert standin.create(name, options=_options()).status_code == 201
    reader = WatchReader(standin)
    try:
        wait_until(lambda: len(reader.events) >= 2, 10, what="the initial events")
        assert [(e["type"], e["object"]["instance_id"]) for e in reader.events[:2]] == [
            ("CREATED", "pre-a"),
            ("CREATED", "pre-b"),
        ]
    finally:
        reader.close()


def test_watch_since_replays_and_many_watchers_see_the_same(standin: LauncherProcess) -> None:
    start = standin.client.get("/v2/vllm/instances").json()["revision"]
    readers = [WatchReader(standin, {"since": start}) for _ in range(10)]
    try:
        assert standin.create("multi", options=_options()).status_code == 201
        assert standin.client.delete("/v2/vllm/instances/multi").status_code == 200
        for reader in readers:
            wait_until(lambda r=reader: "DELETED" in r.types_for("multi"), 20, what="DELETED on every watcher")
        expected = readers[0].events
        assert all(reader.events == expected for reader in readers)
        late = WatchReader(standin, {"since": start})  # resumes from the window, after the fact
        wait_until(lambda: "DELETED" in late.types_for("multi"), 10, what="the replay")
        assert late.events[: len(expected)] == expected
        late.close()
    finally:
        for reader in readers:
            reader.close()


def test_watch_since_bad_values(standin: LauncherProcess) -> None:
    revision = standin.client.get("/v2/vllm/instances").json()["revision"]
    assert standin.client.get("/v2/vllm/instances/watch", params={"since": "abc"}).status_code == 400
    assert standin.client.get("/v2/vllm/instances/watch", params={"since": revision + 5}).status_code == 400


def test_watch_since_older_than_the_window_is_410() -> None:
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_WATCH_WINDOW": "3"})
    try:
        for index in range(3):
            assert launcher.create(f"w{index}", options=_options()).status_code == 201
        wait_until(lambda: launcher.client.get("/v2/vllm/instances").json()["revision"] >= 6, 20, what="READY events")
        response = launcher.client.get("/v2/vllm/instances/watch", params={"since": 0})
        assert response.status_code == 410
        assert "too old" in response.json()["detail"]
    finally:
        assert not launcher.stop()


@pytest.mark.parametrize("server", ["launcher", "uvicorn"])
def test_sigterm_with_an_open_watch_shuts_down_promptly(server: str) -> None:
    # "uvicorn": plain `uvicorn launcher.app:app` with its default flags (no graceful timeout).
    launcher = LauncherProcess(workload="standin", server=server)
    reader = WatchReader(launcher)
    try:
        assert launcher.create("lingering", options=_options()).status_code == 201
        started = time.monotonic()
        launcher.process.send_signal(signal.SIGTERM)
        launcher.process.wait(60)
        # The stream was ended at once, not after uvicorn's graceful timeout or never.
        assert time.monotonic() - started < 20
        assert reader.ended.wait(10)
    finally:
        reader.close()
        assert not launcher.stop()


def test_gpu_uuids_become_cuda_visible_devices(standin: LauncherProcess) -> None:
    gpus = standin.client.get("/v2/vllm/gpus").json()
    assert gpus["count"] == 4 and gpus["mock"] is True
    assert [gpu["uuid"] for gpu in gpus["gpus"]] == ["GPU-0", "GPU-1", "GPU-2", "GPU-3"]
    response = standin.create("gpu", options=_options(extra="--print-env CUDA_VISIBLE_DEVICES"), gpu_uuids=["GPU-2", "GPU-0"])
    assert response.status_code == 201, response.text
    wait_until(lambda: b"ENV CUDA" in standin.client.get("/v2/vllm/instances/gpu/log").content, 10, what="env line")
    assert b"ENV CUDA_VISIBLE_DEVICES=2,0" in standin.client.get("/v2/vllm/instances/gpu/log").content
    assert standin.state("gpu")["gpu_uuids"] == ["GPU-2", "GPU-0"]
    users = {gpu["uuid"]: gpu["instances"] for gpu in standin.client.get("/v2/vllm/gpus").json()["gpus"]}
    assert users == {"GPU-0": ["gpu"], "GPU-1": [], "GPU-2": ["gpu"], "GPU-3": []}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"gpu_uuids": ["GPU-9"]}, "GPU-9"),
        ({"gpu_uuids": ["GPU-1", "GPU-1"]}, "more than once"),
        ({"gpu_uuids": "GPU-1"}, "gpu_uuids"),
    ],
)
def test_gpu_mistakes_are_4xx(standin: LauncherProcess, body: dict[str, Any], words: str) -> None:
    response = standin.create("bad-gpu", options=_options(), **body)
    assert response.status_code in (400, 422)
    assert words in response.json()["detail"]
    assert standin.client.get("/v2/vllm/instances/bad-gpu").status_code == 404


def test_matching_cuda_visible_devices_is_fine(standin: LauncherProcess) -> None:
    response = standin.create("gpu-ok", options=_options(), gpu_uuids=["GPU-1"], env_vars={"CUDA_VISIBLE_DEVICES": "1"})
    assert response.status_code == 201 and "warning" not in response.json()


def test_gpu_uuids_win_over_cuda_visible_devices_and_the_answer_says_so(standin: LauncherProcess) -> None:
    """FMA's docs/launcher.md Example 3 sends both: gpu_uuids win (FMA's rule), and the answer warns."""
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "VLLM_ATTENTION_BACKEND": "FLASHINFER"}
    options = _options(extra="--print-env CUDA_VISIBLE_DEVICES")
    response = standin.create("example-3", options=options, gpu_uuids=["GPU-3", "GPU-2"], env_vars=env)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["env_vars"] == {"CUDA_VISIBLE_DEVICES": "3,2", "VLLM_ATTENTION_BACKEND": "FLASHINFER"}
    assert "CUDA_VISIBLE_DEVICES='0,1' replaced by '3,2'" in body["warning"]
    assert "replaced" in response.headers["warning"]
    assert standin.state("example-3")["env_vars"]["CUDA_VISIBLE_DEVICES"] == "3,2"
    log = "/v2/vllm/instances/example-3/log"
    wait_until(lambda: b"ENV CUDA" in standin.client.get(log).content, 10, what="env line")
    assert b"ENV CUDA_VISIBLE_DEVICES=3,2" in standin.client.get(log).content


def test_port_is_picked_when_options_have_none(standin: LauncherProcess) -> None:
    response = standin.create("auto-port", options="--model standin-model")
    assert response.status_code == 201, response.text
    port = response.json()["port"]
    assert standin.state("auto-port")["port"] == port
    wait_until(lambda: standin.state("auto-port")["ready"], 20, what="the instance on the picked port")
    assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200


def test_port_conflicts_are_409_before_forking(standin: LauncherProcess) -> None:
    port = free_port()
    assert standin.create("owner", options=_options(port)).status_code == 201
    second = standin.create("intruder", options=_options(port))
    assert second.status_code == 409
    assert "owner" in second.json()["detail"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        third = standin.create("intruder", options=_options(busy))
        assert third.status_code == 409
        assert "busy" in third.json()["detail"]
    assert standin.client.get("/v2/vllm/instances/intruder").status_code == 404


def test_instance_limit_is_429_and_stopped_ones_do_not_count() -> None:
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_MAX_INSTANCES": "2"})
    try:
        assert launcher.create("a", options=_options()).status_code == 201
        assert launcher.create("b", options=_options()).status_code == 201
        third = launcher.create("c", options=_options())
        assert third.status_code == 429
        assert "limit" in third.json()["detail"]
        assert third.headers["retry-after"] == "1"
        os.kill(launcher.state("b")["pid"], signal.SIGKILL)
        wait_until(lambda: launcher.state("b")["status"] == "stopped", 20, what="b to stop")
        assert launcher.create("d", options=_options()).status_code == 201  # b no longer counts
        assert launcher.create("e", options=_options()).status_code == 429
    finally:
        assert not launcher.stop()


def test_reserved_id_watch(standin: LauncherProcess) -> None:
    assert standin.create("watch", options=_options()).status_code == 400
