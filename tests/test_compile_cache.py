"""vLLM's default mode (torch.compile) with the real vLLM: compile once, then load.

The first instance of a model on an empty vLLM cache compiles it and vLLM saves the artifact;
every later instance loads it (forkserver/compile_cache_compat.py: without it vLLM 0.32 on CPU
fails to load and compiles again on every start). The front door compiles a model ahead, in a
throwaway instance, so that even its first request finds the artifact (launcher/frontdoor/compile_ahead.py).
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from launcher.frontdoor.compile_ahead import COMPILE_ANNOTATION
from tests.conftest import real_vllm_launcher
from tests.launcher_process import (
    DEFAULT_MODE_FLAGS,
    SERVE_FLAGS,
    LauncherProcess,
    free_port,
    wait_instance_healthy,
    wait_until,
)

pytestmark = pytest.mark.vllm

LOADED = b"Directly load AOT compilation from path"
COMPILED_AGAIN = b"Compiling model again due to a load failure"
SAVED = b"saved AOT compiled function"


def _start(launcher: LauncherProcess, instance_id: str, model: Path) -> int:
    port = free_port()
    response = launcher.create(instance_id, options=f"--model {model} --port {port} {DEFAULT_MODE_FLAGS}")
    assert response.status_code == 201, response.text
    return port


def _ready(launcher: LauncherProcess, instance_id: str, port: int) -> tuple[dict[str, Any], bytes]:
    wait_instance_healthy(launcher, instance_id, port, timeout=600)
    wait_until(lambda: launcher.state(instance_id)["ready"], 30, 0.1, f"{instance_id} ready")
    return launcher.state(instance_id), launcher.client.get(f"/v2/vllm/instances/{instance_id}/log").content


def _complete(port: int, model: Path) -> str:
    body = {"model": str(model), "prompt": "Hello there", "max_tokens": 8, "temperature": 0}
    response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def _delete(launcher: LauncherProcess, instance_id: str) -> None:
    assert launcher.client.delete(f"/v2/vllm/instances/{instance_id}").status_code == 200


def test_the_second_instance_loads_the_compiled_model(tiny_model: Path) -> None:
    with real_vllm_launcher() as launcher:
        port = _start(launcher, "first", tiny_model)
        first, first_log = _ready(launcher, "first", port)
        assert SAVED in first_log, first_log.decode(errors="replace")[-3000:]
        assert first["start_phases"]["compile"] > 0  # an empty cache: it compiled
        text = _complete(port, tiny_model)
        _delete(launcher, "first")

        port = _start(launcher, "second", tiny_model)
        second, second_log = _ready(launcher, "second", port)
        assert LOADED in second_log and COMPILED_AGAIN not in second_log, second_log.decode(errors="replace")[-3000:]
        phases = second["start_phases"]
        assert set(phases) == {"parse", "fork", "engine_init", "load", "weights_shared", "compile", "graphs", "ready"}
        assert phases["compile"] < 1.0, phases  # loading the artifact, not compiling (about 5 s)
        assert phases["graphs"] == 0  # no CUDA graphs on CPU
        assert _complete(port, tiny_model) == text  # the loaded model computes what the compiled one did
        _delete(launcher, "second")


def test_two_instances_compiling_one_model_at_once_leave_a_cache_that_loads(tiny_model: Path) -> None:
    with real_vllm_launcher() as launcher:
        ports = {name: _start(launcher, name, tiny_model) for name in ("a", "b")}  # both on the empty cache
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            states = dict(zip(ports, pool.map(lambda name: _ready(launcher, name, ports[name]), ports)))
        texts = {name: _complete(port, tiny_model) for name, port in ports.items()}
        assert texts["a"] == texts["b"]
        assert all(SAVED in log for _, log in states.values())  # both compiled and wrote the artifact
        for name in ports:
            _delete(launcher, name)

        port = _start(launcher, "c", tiny_model)
        _, log = _ready(launcher, "c", port)
        assert LOADED in log and COMPILED_AGAIN not in log, log.decode(errors="replace")[-3000:]
        assert _complete(port, tiny_model) == texts["a"]
        _delete(launcher, "c")


@pytest.fixture
def compiling_door(tmp_path: Path, tiny_model: Path) -> Iterator[LauncherProcess]:
    models = {"idle_timeout": 0, "models": {"dm": {"options": f"--model {tiny_model} {DEFAULT_MODE_FLAGS}"}}}
    models_file = tmp_path / "models.yaml"
    models_file.write_text(json.dumps(models))  # JSON is YAML
    with real_vllm_launcher(LAUNCHER_MODELS_FILE=str(models_file)) as launcher:
        yield launcher


def test_the_front_door_compiles_a_model_ahead_of_its_first_request(compiling_door: LauncherProcess) -> None:
    door = compiling_door
    seen: set[Any] = set()

    def compiled() -> bool:
        seen.add(door.client.get("/v2/vllm/models/dm").json()["compiled"])
        return True in seen

    wait_until(compiled, 600, 0.1, "model dm compiled ahead")
    assert "compiling" in seen  # the empty cache meant a compile, in a throwaway instance...
    wait_until(lambda: not door.client.get("/v2/vllm/instances").json()["instances"], 60, 0.1, "no throwaway left")
    state = door.client.get("/v2/vllm/models/dm").json()
    assert state["state"] == "stopped" and state["compile_error"] is None

    with openai.OpenAI(base_url=f"{door.base_url}/v1", api_key="unused", max_retries=0, timeout=300) as sdk:
        answer = sdk.completions.create(model="dm", prompt="Hello", max_tokens=4)
    assert answer.choices[0].text
    instance_id = door.client.get("/v2/vllm/models/dm").json()["instance_id"]
    instance = door.state(instance_id)
    assert COMPILE_ANNOTATION not in (instance.get("annotations") or {})
    log = door.client.get(f"/v2/vllm/instances/{instance_id}/log").content
    assert LOADED in log, log.decode(errors="replace")[-3000:]  # ...so the first request found the artifact
    assert instance["start_phases"]["compile"] < 1.0, instance["start_phases"]

    warm = door.client.post("/v2/vllm/models/dm/warm")
    assert warm.status_code == 202 and warm.json()["compiled"] is True  # nothing left to do


def test_without_a_cpp_compiler_the_launcher_starts_and_eager_instances_serve(tiny_model: Path) -> None:
    """python:3.11-slim has no C++ compiler: torch's vector-ISA probe raised in the preload, and the
    forkserver exited (restarted every 8 s, /health 503 for ever). Now: one warning, the fix off."""
    with real_vllm_launcher(CXX="no-such-c++-compiler") as launcher:  # torch finds no compiler
        said = "forkserver: warning: torch cannot probe the CPU's vector instructions"
        assert launcher.output_text().count(said) == 1, launcher.output_text()[-3000:]
        port = free_port()
        response = launcher.create("eager", options=f"--model {tiny_model} --port {port} {SERVE_FLAGS}")
        assert response.status_code == 201, response.text
        wait_instance_healthy(launcher, "eager", port)
        assert _complete(port, tiny_model)
        _delete(launcher, "eager")
