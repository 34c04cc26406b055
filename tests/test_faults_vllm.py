"""The fault matrix with the real vLLM: killed instance, killed EngineCore, killed forkserver, killed API."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import httpx
import psutil
import pytest

from tests.launcher_process import SERVE_FLAGS, VLLM_ENV, LauncherProcess, process_alive, wait_until

pytestmark = pytest.mark.vllm


def _start_ready(launcher: LauncherProcess, instance_id: str, model: Path) -> dict:
    response = launcher.create(instance_id, options=f"--model {model} {SERVE_FLAGS}")
    assert response.status_code == 201, response.text

    def ready() -> dict | bool:
        state = launcher.state(instance_id)
        assert state["status"] == "running", launcher.client.get(f"/v2/vllm/instances/{instance_id}/log").text[-3000:]
        return state["ready"] and state

    return wait_until(ready, 240, 0.25, f"{instance_id} ready")


def _tree(pid: int) -> list[int]:
    return [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]


@pytest.mark.parametrize("target", ["main", "engine"])
def test_instance_killed_from_outside(vllm_launcher: LauncherProcess, tiny_model: Path, target: str) -> None:
    name = f"killed-{target}"
    state = _start_ready(vllm_launcher, name, tiny_model)
    tree = _tree(state["pid"])
    assert len(tree) == 2, tree  # the instance and its forked EngineCore
    victim = tree[0] if target == "main" else tree[1]
    os.kill(victim, signal.SIGKILL)
    stopped = wait_until(lambda: (s := vllm_launcher.state(name))["status"] == "stopped" and s, 120, 0.25, "stop")
    if target == "main":
        assert stopped["exit_code"] == -signal.SIGKILL
    else:
        # vLLM notices its engine died and shuts its server down by itself: its own exit code.
        assert isinstance(stopped["exit_code"], int)
        assert b"EngineCore" in vllm_launcher.client.get(f"/v2/vllm/instances/{name}/log").content
    assert not [pid for pid in tree if process_alive(pid)]
    assert len(vllm_launcher.client.get(f"/v2/vllm/instances/{name}/log").content) > 0
    assert vllm_launcher.client.delete(f"/v2/vllm/instances/{name}").status_code == 200


def test_killed_forkserver_is_reported_and_replaced(tiny_model: Path) -> None:
    cache = tempfile.mkdtemp(prefix="vllm-cache-")
    launcher = LauncherProcess(workload="vllm", env={**VLLM_ENV, "VLLM_CACHE_ROOT": cache}, ready_timeout=300)
    try:
        state = _start_ready(launcher, "orphan-to-be", tiny_model)
        tree = _tree(state["pid"])
        os.kill(launcher.forkserver_pid(), signal.SIGKILL)
        stopped = wait_until(lambda: (s := launcher.state("orphan-to-be"))["status"] == "stopped" and s, 30, 0.1, "stop")
        assert "forkserver" in stopped["stop_reason"]
        # Honest while the new forkserver preloads vLLM again.
        health = launcher.client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        wait_until(lambda: not [pid for pid in tree if process_alive(pid)], 10, what="the instance to die with it")
        wait_until(lambda: launcher.client.get("/health").status_code == 200, 300, 0.5, "a new forkserver")
        again = _start_ready(launcher, "after", tiny_model)
        answer = httpx.post(
            f"http://127.0.0.1:{again['port']}/v1/completions",
            json={"model": str(tiny_model), "prompt": "Hi", "max_tokens": 3},
            timeout=60,
        )
        assert answer.status_code == 200
    finally:
        assert not launcher.stop()
        shutil.rmtree(cache, ignore_errors=True)


def test_sigkilled_api_takes_everything_with_it(tiny_model: Path) -> None:
    launcher = LauncherProcess(workload="vllm", env=VLLM_ENV, ready_timeout=300)
    _start_ready(launcher, "left-behind", tiny_model)
    tree = launcher.descendants()
    assert len(tree) == 3  # forkserver, instance, EngineCore
    # Every process gone within seconds (stop() waits up to 10 s), none of them killed by the test.
    # Segments a SIGKILLed launcher leaves are swept by the next one at start-up (test_faults.py).
    assert launcher.stop(signal.SIGKILL) == []
