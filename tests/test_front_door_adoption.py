"""Front-door instances across an API restart: adopted by their model, never doubled.

A forkserver started on its own keeps the instances when the API is SIGKILLed. The next API
that attaches takes back each model's instance if it was started with the model's current
profile (``ready`` again; idle stop and eviction apply), and stops the others: no model ever
has two instances. Once with the stand-in (fast), once with the real vLLM and the tiny model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from launcher.frontdoor.profiles import MODEL_ANNOTATION
from tests.launcher_process import REPO, SERVE_FLAGS, VLLM_ENV, LauncherProcess, process_alive, wait_until


def _front_door_instances(launcher: LauncherProcess, model: str) -> list[dict[str, Any]]:
    listing = launcher.client.get("/v2/vllm/instances").json()["instances"]
    return [item for item in listing if (item.get("annotations") or {}).get(MODEL_ANNOTATION) == model]


class _Node:
    """A standalone forkserver, and launchers attached to it one after the other."""

    def __init__(self, workload: str, env: dict[str, str]) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="fd-adopt-"))
        self.socket = str(self.workdir / "run" / "fs.sock")
        self.workload = workload
        self.env = {"LAUNCHER_FORKSERVER_SOCKET": self.socket, "LAUNCHER_LOG_DIR": str(self.workdir / "logs"), **env}
        self.forkserver = subprocess.Popen(
            [sys.executable, "-m", "forkserver", "--socket", self.socket, "--workload", workload],
            cwd=REPO,
            env={**os.environ, **env, "TMPDIR": str(self.workdir)},
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(lambda: os.path.exists(self.socket), 300, what="the standalone forkserver")

    def launcher(self, models: dict[str, Any]) -> LauncherProcess:
        models_file = self.workdir / f"models-{len(os.listdir(self.workdir))}.yaml"
        models_file.write_text(json.dumps(models))  # JSON is YAML
        return LauncherProcess(
            workload=self.workload, env={**self.env, "LAUNCHER_MODELS_FILE": str(models_file)}, ready_timeout=300.0
        )

    def close(self) -> None:
        self.forkserver.send_signal(signal.SIGTERM)
        try:
            self.forkserver.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.forkserver.pid, signal.SIGKILL)
            self.forkserver.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _ask(launcher: LauncherProcess, model: str) -> httpx.Response:
    return launcher.client.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2}, timeout=300)


def _check_adoption(node: _Node, options: str) -> None:
    models = {"idle_timeout": 0, "models": {"fr": {"options": options}, "gone": {"options": options}}}
    first = node.launcher(models)
    try:
        assert _ask(first, "fr").status_code == 200
        assert _ask(first, "gone").status_code == 200
        [kept] = _front_door_instances(first, "fr")
        [dropped] = _front_door_instances(first, "gone")
    finally:
        first.stop(signal.SIGKILL)  # the API dies; the standalone forkserver keeps the instances
    assert process_alive(kept["pid"]) and process_alive(dropped["pid"])

    # The same profile for "fr"; "gone" is no longer in the file.
    second = node.launcher({"idle_timeout": 0, "models": {"fr": {"options": options}}})
    try:
        state = second.client.get("/v2/vllm/models/fr").json()
        assert state["state"] == "ready" and state["instance_id"] == kept["instance_id"], state
        assert _ask(second, "fr").status_code == 200
        assert [item["instance_id"] for item in _front_door_instances(second, "fr")] == [kept["instance_id"]]
        wait_until(lambda: not _front_door_instances(second, "gone"), 60, what="the vanished profile's instance to go")
        assert not process_alive(dropped["pid"])
    finally:
        second.stop(signal.SIGKILL)

    # A changed profile: the old instance is stopped, the next request starts the new one.
    third = node.launcher({"idle_timeout": 0, "models": {"fr": {"options": options + " --served-model-name fr x"}}})
    try:
        wait_until(lambda: not process_alive(kept["pid"]), 60, what="the instance of the changed profile to stop")
        assert third.client.get("/v2/vllm/models/fr").json()["state"] == "stopped"
        assert _ask(third, "fr").status_code == 200
        assert len(_front_door_instances(third, "fr")) == 1
    finally:
        third.client.delete("/v2/vllm/instances")
        third.stop()


@pytest.fixture
def standin_node() -> Iterator[_Node]:
    node = _Node("standin", {})
    try:
        yield node
    finally:
        node.close()


def test_an_api_restart_adopts_front_door_instances_with_the_standin(standin_node: _Node) -> None:
    _check_adoption(standin_node, "--model M")


@pytest.mark.vllm
def test_an_api_restart_adopts_front_door_instances_with_the_real_vllm(tiny_model: Path) -> None:
    cache = tempfile.mkdtemp(prefix="vllm-cache-")
    node = _Node("vllm", {**VLLM_ENV, "VLLM_CACHE_ROOT": cache, "LAUNCHER_STOP_TIMEOUT": "20"})
    try:
        _check_adoption(node, f"--model {tiny_model} {SERVE_FLAGS}")
    finally:
        node.close()
        shutil.rmtree(cache, ignore_errors=True)


def test_a_sleeping_model_is_adopted_asleep_and_woken_by_the_next_request(standin_node: _Node) -> None:
    models = {"models": {"nap": {"options": "--model N --gpu-memory-utilization 0.5", "idle": "sleep",
                                 "idle_timeout": 1}}}  # fmt: skip
    first = standin_node.launcher(models)
    try:
        assert _ask(first, "nap").status_code == 200
        [instance] = _front_door_instances(first, "nap")
        wait_until(lambda: first.state(instance["instance_id"]).get("sleeping"), 20, what="nap asleep")
    finally:
        first.stop(signal.SIGKILL)
    second = standin_node.launcher(models)
    try:
        state = second.client.get("/v2/vllm/models/nap").json()
        assert state["state"] == "sleeping" and state["instance_id"] == instance["instance_id"], state
        assert _ask(second, "nap").status_code == 200  # woken, not started again
        assert [item["instance_id"] for item in _front_door_instances(second, "nap")] == [instance["instance_id"]]
        assert "sleeping" not in second.state(instance["instance_id"])
    finally:
        second.client.delete("/v2/vllm/instances")
        second.stop()


def test_a_front_door_instance_with_gpus_is_adopted_after_an_api_restart() -> None:
    """The CUDA_VISIBLE_DEVICES added to its env_vars for gpu_uuids does not make it another configuration."""
    node = _Node("standin", {"LAUNCHER_MOCK_GPUS": "1"})
    try:
        models = {"idle_timeout": 0, "models": {"fr": {"options": "--model fr", "gpu_uuids": ["GPU-0"]}}}
        first = node.launcher(models)
        try:
            assert _ask(first, "fr").status_code == 200
            [kept] = _front_door_instances(first, "fr")
        finally:
            first.stop(signal.SIGKILL)
        assert process_alive(kept["pid"])
        second = node.launcher(models)
        try:
            state = second.client.get("/v2/vllm/models/fr").json()
            assert state["state"] == "ready" and state["instance_id"] == kept["instance_id"], (state, kept)
        finally:
            second.stop()
    finally:
        node.close()
