"""A stream waiting for its model's start is never silent (``start_keepalive``), stand-in workload.

Raw SSE shows the comment lines, sent while the model is still starting; the ``openai`` SDK
(stream and not) reads through them; a failed start ends the stream with an error event the
SDK raises; without the switch a stream waits in silence and a failed start is a 502, as before.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.launcher_process import LauncherProcess, wait_until
from tests.test_front_door_standin import front_door, model_state

MODELS = """\
models:
  slow: {options: "--model S --startup-delay 4", start_keepalive: true, idle_timeout: 0}
  broken: {options: "--model B --startup-delay 1 --fail-at-start --exit-code 5", start_keepalive: true}
  quiet: {options: "--model Q --startup-delay 1", idle_timeout: 0}
  refusing: {options: "--model R --served-model-name someone-else", start_keepalive: true}
"""


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[LauncherProcess]:
    with front_door(tmp_path, MODELS) as door:
        yield door


def sdk(launcher: LauncherProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{launcher.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_a_waiting_stream_gets_comments_while_the_model_starts(launcher: LauncherProcess) -> None:
    body = {"model": "slow", "prompt": "hi", "stream": True, "chunks": 2}
    with httpx.stream("POST", f"{launcher.base_url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        first = next(lines)
        assert model_state(launcher, "slow")["state"] == "starting"  # bytes came before the model was up
        assert first.startswith(": starting slow, ") and first.endswith(" s"), first
        rest = [line for line in lines if line]
    comments = [first] + [line for line in rest if line.startswith(":")]
    events = [line for line in rest if line.startswith("data: ")]
    assert len(comments) >= 2, comments  # at once, then every few seconds of the 4 s start
    assert all(line.split(", ")[1] in ("starting", "waiting for room") for line in comments), comments
    assert [json.loads(line[6:])["chunk"] for line in events[:-1]] == [0, 1] and events[-1] == "data: [DONE]"


def test_the_openai_sdk_reads_through_the_comments_streamed_or_not(launcher: LauncherProcess) -> None:
    with sdk(launcher) as client:
        chunks = list(client.completions.create(model="slow", prompt="hi", stream=True, extra_body={"chunks": 3}))
        assert [chunk.model_extra["chunk"] for chunk in chunks] == [0, 1, 2]  # type: ignore[index]
        answer = client.completions.create(model="slow", prompt="hi")  # ready now: a plain answer
        assert answer.model == "slow"
        launcher.client.post("/v2/vllm/models/slow/stop", timeout=60)
        answer = client.completions.create(model="slow", prompt="hi")  # not a stream: it waits, then answers
        assert answer.model == "slow"


def test_a_failed_start_ends_the_kept_alive_stream_with_an_error_the_sdk_raises(launcher: LauncherProcess) -> None:
    with sdk(launcher) as client, pytest.raises(openai.APIError) as caught:
        for _ in client.completions.create(model="broken", prompt="hi", stream=True):
            pass
    assert "failed to start" in caught.value.message and "exited with code 5" in caught.value.message
    with httpx.stream("POST", f"{launcher.base_url}/v1/completions", timeout=60,
                      json={"model": "broken", "prompt": "hi", "stream": True}) as response:  # fmt: skip
        lines = [line for line in response.iter_lines() if line]
    assert response.status_code == 200 and lines[0].startswith(": starting broken")
    error = json.loads(lines[-1].removeprefix("data: "))["error"]
    assert error["code"] == "model_start_failed" and error["type"] == "InternalServerError"


def test_an_instance_refusing_the_request_is_an_error_event(launcher: LauncherProcess) -> None:
    with httpx.stream("POST", f"{launcher.base_url}/v1/completions", timeout=60,
                      json={"model": "refusing", "prompt": "hi", "stream": True}) as response:  # fmt: skip
        lines = [line for line in response.iter_lines() if line]
    assert lines[0].startswith(": starting refusing")
    assert json.loads(lines[-1].removeprefix("data: "))["error"]["message"] == "no model 'refusing'"


def test_without_the_switch_a_waiting_stream_is_silent_until_its_start(launcher: LauncherProcess) -> None:
    started = time.monotonic()
    with httpx.stream("POST", f"{launcher.base_url}/v1/completions", timeout=60,
                      json={"model": "quiet", "prompt": "hi", "stream": True}) as response:  # fmt: skip
        assert model_state(launcher, "quiet")["state"] == "ready"  # the headers came with the instance
        lines = [line for line in response.iter_lines() if line]
    assert time.monotonic() - started >= 1.0
    assert not [line for line in lines if line.startswith(":")] and lines[-1] == "data: [DONE]"


def test_the_launcher_default_turns_it_on_for_profiles_that_do_not_say(tmp_path: Path) -> None:
    with front_door(tmp_path, MODELS, LAUNCHER_START_KEEPALIVE="1") as launcher:
        with httpx.stream("POST", f"{launcher.base_url}/v1/completions", timeout=60,
                          json={"model": "quiet", "prompt": "hi", "stream": True}) as response:  # fmt: skip
            first = next(response.iter_lines())
        assert first.startswith(": starting quiet, ")
        wait_until(lambda: model_state(launcher, "quiet")["state"] == "ready", 30, what="quiet ready")
