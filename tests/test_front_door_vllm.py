"""The front door with the real vLLM serving the tiny model, driven by the ``openai`` SDK.

One launcher for the module (``max_instances`` 2, so the third model needs an eviction); the
tests run in file order and each says what it expects to be running when it starts.
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

from launcher.frontdoor.profiles import MODEL_ANNOTATION
from tests.conftest import real_vllm_launcher
from tests.launcher_process import SERVE_FLAGS, LauncherProcess, WatchReader, wait_until

pytestmark = pytest.mark.vllm

# A stream that lasts a while, and says at its end how many tokens it carried.
LONG: dict[str, Any] = {
    "max_tokens": 240,
    "stream_options": {"include_usage": True},
    "extra_body": {"ignore_eos": True, "min_tokens": 240},
}


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[LauncherProcess]:
    folder = tmp_path_factory.mktemp("front-door")
    flags = f"--model {tiny_model} {SERVE_FLAGS}"
    models = {
        "idle_timeout": 0,
        "models": {
            "tiny": {"options": flags, "aliases": ["tiny-chat"]},
            "tiny2": {"options": flags},
            "tiny3": {"options": flags},
            "idler": {"options": flags, "idle_timeout": 2},
            "kept": {"options": flags, "start_keepalive": True, "idle_timeout": 1},
            "napper": {"options": flags, "idle": "sleep", "idle_timeout": 1},
            # Passes vLLM's parser (checked at load), fails in the instance: longer than the model allows.
            "broken": {"options": f"--model {tiny_model} --enforce-eager --max-model-len 100000"},
        },
    }
    models_file = folder / "models.yaml"
    models_file.write_text(json.dumps(models))  # JSON is YAML
    with real_vllm_launcher(
        LAUNCHER_MODELS_FILE=str(models_file), LAUNCHER_MAX_INSTANCES="2", LAUNCHER_QUEUE_TIMEOUT="240"
    ) as launcher:
        yield launcher


@pytest.fixture(scope="module")
def client(door: LauncherProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{door.base_url}/v1", api_key="unused", max_retries=0, timeout=300) as sdk:
        yield sdk


def state(door: LauncherProcess, model: str) -> dict[str, Any]:
    answer: dict[str, Any] = door.client.get(f"/v2/vllm/models/{model}").json()
    return answer


def live_instances_of(door: LauncherProcess, model: str) -> list[dict[str, Any]]:
    listing = door.client.get("/v2/vllm/instances").json()["instances"]
    return [
        item for item in listing
        if _model_of(item) == model and item["status"] == "running"
    ]  # fmt: skip


def _model_of(instance: dict[str, Any]) -> str | None:
    return (instance.get("annotations") or {}).get(MODEL_ANNOTATION)


def test_models_are_listed_in_openai_format(client: openai.OpenAI) -> None:
    models = client.models.list().data
    names = ["tiny", "tiny-chat", "tiny2", "tiny3", "idler", "kept", "napper", "broken"]
    assert [model.id for model in models] == names
    assert all(model.object == "model" and (model.model_extra or {})["state"] == "stopped" for model in models)


def test_completion_chat_and_streams_through_the_front_door(client: openai.OpenAI, door: LauncherProcess) -> None:
    completion = client.completions.create(model="tiny", prompt="Hello, my name is", max_tokens=5)
    assert completion.model == "tiny" and completion.choices[0].text is not None
    assert completion.usage is not None and completion.usage.completion_tokens == 5

    chat = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=5
    )
    # vLLM accepts every served name and answers with the first one: the profile's name.
    assert chat.model == "tiny" and chat.choices[0].message.role == "assistant"

    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=12, stream=True))
    assert len(chunks) > 6  # piece by piece, as vLLM sends them (it may join bytes of one character)
    assert chunks[-1].choices[0].finish_reason == "length"
    chat_chunks = list(client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True
    ))  # fmt: skip
    assert any(chunk.choices and chunk.choices[0].finish_reason == "length" for chunk in chat_chunks)
    assert len(live_instances_of(door, "tiny")) == 1  # the alias reached the same instance


def test_eight_requests_for_a_stopped_model_start_one_instance(client: openai.OpenAI, door: LauncherProcess) -> None:
    assert state(door, "tiny2")["state"] == "stopped"
    watch = WatchReader(door)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(
            lambda n: client.completions.create(model="tiny2", prompt=f"Request {n}", max_tokens=3), range(8)
        ))  # fmt: skip
    assert all(answer.choices[0].text is not None for answer in answers)
    created = [
        event["object"]["instance_id"] for event in watch.events
        if event["type"] == "CREATED" and _model_of(event["object"]) == "tiny2"
    ]  # fmt: skip
    assert created == [state(door, "tiny2")["instance_id"]]
    watch.close()


def test_the_least_recently_used_model_is_evicted(client: openai.OpenAI, door: LauncherProcess) -> None:
    # Running: tiny (used first) and tiny2; max_instances is 2.
    assert state(door, "tiny")["state"] == state(door, "tiny2")["state"] == "ready"
    client.completions.create(model="tiny3", prompt="Hello", max_tokens=3)
    assert state(door, "tiny")["state"] == "stopped"
    assert state(door, "tiny2")["state"] == state(door, "tiny3")["state"] == "ready"
    assert live_instances_of(door, "tiny") == []


def test_a_stream_in_flight_survives_an_eviction_attempt(client: openai.OpenAI, door: LauncherProcess) -> None:
    # Running: tiny2 (least recently used) and tiny3. tiny2 streams while tiny needs a slot.
    streaming_instance = state(door, "tiny2")["instance_id"]
    stream = client.completions.create(model="tiny2", prompt="Once upon a time", stream=True, **LONG)
    chunks = [next(iter(stream))]
    assert state(door, "tiny2")["in_flight"] == 1
    client.completions.create(model="tiny", prompt="Hello", max_tokens=3)  # evicts the idle tiny3
    chunks += list(stream)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 240  # nothing was cut
    assert state(door, "tiny2")["instance_id"] == streaming_instance
    assert state(door, "tiny3")["state"] == "stopped"


def test_a_client_that_hangs_up_aborts_the_generation(client: openai.OpenAI, door: LauncherProcess) -> None:
    # Running: tiny2 and tiny. A 240-token generation takes about 0.7 s on this machine.
    port = live_instances_of(door, "tiny")[0]["port"]

    def sample(name: str, label: str = "") -> float:
        for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
            if line.startswith(name + "{") and label in line:
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"vLLM has no metric {name}")

    finished_before = sample("vllm:request_success_total", 'finished_reason="length"')
    stream = client.completions.create(model="tiny", prompt="Once upon a time", stream=True, **LONG)
    next(iter(stream))
    stream.close()
    wait_until(lambda: state(door, "tiny")["in_flight"] == 0, 10, what="the front door to end the request")
    wait_until(lambda: sample("vllm:num_requests_running") == 0, 30, what="vLLM to drop the request")
    # Had vLLM gone on generating, the request would have finished by its length by now.
    assert sample("vllm:request_success_total", 'finished_reason="length"') == finished_before


def test_an_idle_model_stops_and_the_watch_shows_it(client: openai.OpenAI, door: LauncherProcess) -> None:
    watch = WatchReader(door)
    client.completions.create(model="idler", prompt="Hello", max_tokens=3)  # idle_timeout: 2 s
    instance_id = state(door, "idler")["instance_id"]
    wait_until(lambda: "DELETED" in watch.types_for(instance_id), 60, what="the idle stop")
    assert state(door, "idler")["state"] == "stopped"
    watch.close()


def test_a_failed_start_answers_every_waiter_and_leaves_nothing(client: openai.OpenAI, door: LauncherProcess) -> None:
    def ask(_: int) -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="broken", prompt="Hello", max_tokens=3)
        return caught.value

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        errors = list(pool.map(ask, range(3)))
    for error in errors:
        assert error.status_code == 502
        assert "failed to start" in error.message and "max_model_len (100000)" in error.message  # the cause
        assert "\n" not in error.message and "Traceback" not in error.message  # one line, no traceback
        assert "GET /v2/vllm/models/broken/log" in error.message
    log = door.client.get("/v2/vllm/models/broken/log")
    assert log.status_code == 200 and "Traceback" in log.text and "max_model_len" in log.text
    assert live_instances_of(door, "broken") == []
    listing = door.client.get("/v2/vllm/instances").json()["instances"]
    assert not [item for item in listing if _model_of(item) == "broken"]
    assert state(door, "broken")["state"] == "failed"


def test_bad_input_gets_openai_errors(client: openai.OpenAI, door: LauncherProcess) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="nobody", prompt="Hello", max_tokens=3)
    assert "nobody" in unknown.value.message
    for content, code in ((b'{"prompt": "x"}', "model_required"), (b"{oops", "invalid_json")):
        answer = door.client.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400 and answer.json()["error"]["code"] == code


def test_a_kept_alive_stream_hears_from_the_start_then_streams(client: openai.OpenAI, door: LauncherProcess) -> None:
    body = {"model": "kept", "prompt": "Hello", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{door.base_url}/v1/completions", json=body, timeout=300) as response:
        lines = response.iter_lines()
        first = next(lines)
        assert state(door, "kept")["state"] == "starting" and first.startswith(": starting kept, "), first
        events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[0][6:])["choices"][0]["text"] is not None
    wait_until(lambda: state(door, "kept")["state"] == "stopped", 60, what="kept to stop when idle")
    text = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model="kept", prompt="Hello", max_tokens=4, stream=True))  # fmt: skip
    assert text  # the SDK reads through the comments


def test_idle_sleep_on_vllm_cpu_falls_back_to_stop(client: openai.OpenAI, door: LauncherProcess) -> None:
    # vLLM on CPU has no sleep mode (Platform.is_sleep_mode_available() is false, and
    # --enable-sleep-mode would fail the start): the profile is stopped when idle, said once.
    assert client.completions.create(model="napper", prompt="Hello", max_tokens=2).choices
    [instance] = live_instances_of(door, "napper")
    assert "--enable-sleep-mode" not in instance["options"]
    wait_until(lambda: state(door, "napper")["state"] == "stopped", 60, what="napper to stop when idle")
    assert door.output_text().count("instances here have no sleep mode") == 1
