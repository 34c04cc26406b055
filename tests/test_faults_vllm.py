"""The fault matrix with the real vLLM: killed instance, killed EngineCore, killed forkserver, killed API."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path

import httpx
import psutil
import pytest

from tests.launcher_process import SERVE_FLAGS, VLLM_ENV, LauncherProcess, process_alive, start_ready, wait_until

pytestmark = pytest.mark.vllm


def _tree(pid: int) -> list[int]:
    return [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]


@pytest.mark.parametrize("target", ["main", "engine"])
def test_instance_killed_from_outside(vllm_launcher: LauncherProcess, tiny_model: Path, target: str) -> None:
    name = f"killed-{target}"
    state = start_ready(vllm_launcher, name, tiny_model)
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
        state = start_ready(launcher, "orphan-to-be", tiny_model)
        tree = _tree(state["pid"])
        os.kill(launcher.forkserver_pid(), signal.SIGKILL)
        stopped = wait_until(
            lambda: (s := launcher.state("orphan-to-be"))["status"] == "stopped" and s, 30, 0.1, "stop"
        )
        assert "forkserver" in stopped["stop_reason"]
        # Honest while the new forkserver preloads vLLM again.
        health = launcher.client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        wait_until(lambda: not [pid for pid in tree if process_alive(pid)], 10, what="the instance to die with it")
        wait_until(lambda: launcher.client.get("/health").status_code == 200, 300, 0.5, "a new forkserver")
        again = start_ready(launcher, "after", tiny_model)
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
    try:
        start_ready(launcher, "left-behind", tiny_model)
        tree = launcher.descendants()
        assert len(tree) == 4  # forkserver, the model's zygote (its shared weights), instance, EngineCore
        assert [process.name() for process in tree].count("vllm-zygote") == 1
    except BaseException:
        launcher.stop()  # a failed check must not leave a launcher running
        raise
    # Every process gone within seconds (stop() waits up to 10 s), none of them killed by the test.
    # Segments a SIGKILLed launcher leaves are swept by the next one at start-up (test_faults.py).
    assert launcher.stop(signal.SIGKILL) == []


def _segments_of(pid: int) -> set[str]:
    """The /dev/shm files the processes of this test's instance map (read here, not by the launcher)."""
    names = set()
    for pid_in_tree in _tree(pid):
        with contextlib.suppress(psutil.Error):
            for mapping in psutil.Process(pid_in_tree).memory_maps(grouped=True):
                if mapping.path.startswith("/dev/shm/"):
                    names.add(mapping.path.removeprefix("/dev/shm/").removesuffix(" (deleted)"))
    return names


def _tensor_parallel(launcher: LauncherProcess, instance_id: str, model: Path) -> dict:
    response = launcher.create(instance_id, options=f"--model {model} {SERVE_FLAGS} --tensor-parallel-size 2")
    assert response.status_code == 201, response.text
    state = wait_until(lambda: (s := launcher.state(instance_id))["ready"] and s, 240, 0.25, f"{instance_id} ready")
    state["segments"] = _segments_of(state["pid"])
    assert any(name.startswith("vllm_dist_") for name in state["segments"]), state  # TP on CPU shares memory
    # The forkserver samples an instance's segments every second: wait until it has seen these.
    ledger = launcher.tmpdir / f"vllm-launcher-{os.getuid()}" / "shm-ledger"
    wait_until(lambda: any("vllm_dist_" in path.read_text() for path in ledger.glob("*.tp")), 30, 0.25, "the ledger")
    return state


@pytest.mark.parametrize("how", ["delete", "sigkill-instance", "sigkill-launcher"])
def test_tensor_parallel_leaves_nothing_in_dev_shm(tiny_model: Path, how: str) -> None:
    temp = Path(tempfile.mkdtemp(prefix="tp-shm-"))  # both launchers' TMPDIR: where the ledger is
    cache = tempfile.mkdtemp(prefix="vllm-cache-")
    env = {**VLLM_ENV, "VLLM_CACHE_ROOT": cache}
    launcher = LauncherProcess(workload="vllm", env=env, ready_timeout=300, tmpdir=temp)
    try:
        state = _tensor_parallel(launcher, "tp", tiny_model)
        if how == "delete":
            assert launcher.client.delete("/v2/vllm/instances/tp").status_code == 200
        elif how == "sigkill-instance":
            os.killpg(state["pid"], signal.SIGKILL)
            wait_until(lambda: launcher.state("tp")["status"] == "stopped", 30, 0.1, "the instance to be reaped")
        else:
            assert launcher.stop(signal.SIGKILL) == []  # nobody is left to unlink anything
            left = state["segments"] & set(os.listdir("/dev/shm"))
            assert left, "the SIGKILL left nothing to sweep: the test tests nothing"
            launcher = LauncherProcess(workload="vllm", env=env, ready_timeout=300, tmpdir=temp)
        wait_until(lambda: not state["segments"] & set(os.listdir("/dev/shm")), 30, 0.25, "its segments gone")
    finally:
        launcher.stop()
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)
