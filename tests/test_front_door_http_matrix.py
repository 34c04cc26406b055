"""The front door as an HTTP intermediary, against a real HTTP peer that misbehaves on purpose.

The instance is the stand-in's asyncio server (``--fast``), told by each request's ``script`` which
bytes to send: truncated answers, interim 1xx, trailers, ``Connection: close``, odd chunking, slow
headers, stalls, closes. The client is a raw socket (the exact bytes), ``curl`` and the ``openai``
SDK. Each case checks what the client gets and how many requests the instance saw: a request is
never sent twice.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import httpx
import openai
import pytest

from tests.launcher_process import LauncherProcess
from tests.test_front_door_standin import front_door, metric, model_state

READ_TIMEOUT = 1.5  # the launcher's --proxy-read-timeout here
OK_HEAD = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
CHUNKED_HEAD = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
SSE_HEAD = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


@dataclass
class Answer:
    """What a client got, parsed as the client would (httptools): whether the answer was whole."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def raw_request(launcher: LauncherProcess, body: dict[str, Any], timeout: float = 20) -> Answer:
    """POST with a plain socket; every byte until the front door closes the connection."""
    payload = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n").encode()  # fmt: skip
    received = b""
    with socket.create_connection(("127.0.0.1", launcher.port), timeout=timeout) as sock:
        sock.sendall(head + payload)
        while chunk := sock.recv(65536):
            received += chunk
    answer = Answer()
    parser = httptools.HttpResponseParser(answer)
    parser.feed_data(received)
    answer.status = parser.get_status_code()
    return answer


def script(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "peer", "prompt": "hi", "script": list(steps), **extra}


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LauncherProcess]:
    models = 'models:\n  peer: {options: "--model P --fast", env_vars: {VLLM_HTTP_TIMEOUT_KEEP_ALIVE: "0.5"}}\n'
    with front_door(tmp_path_factory.mktemp("matrix"), models, LAUNCHER_PROXY_READ_TIMEOUT=str(READ_TIMEOUT)) as launcher:
        assert launcher.client.post("/v2/vllm/models/peer/start", timeout=30).status_code == 200
        yield launcher


def posts_seen(launcher: LauncherProcess) -> int:
    """How many POSTs the model's instance has read (asked of the instance itself)."""
    instance = launcher.state(str(model_state(launcher, "peer")["instance_id"]))
    return int(httpx.get(f"http://127.0.0.1:{instance['port']}/requests", timeout=5).json()["posts"])


CASES: dict[str, tuple[list[dict[str, Any]], Answer]] = {
    "length-truncated": (
        [{"send": OK_HEAD + "content-length: 1000\r\n\r\n0123456789"}, {"close": True}],
        Answer(200, body=b"0123456789", complete=False),
    ),
    "chunked-truncated": (
        [{"send": CHUNKED_HEAD + "5\r\nhello\r\n"}, {"close": True}],
        Answer(200, body=b"hello", complete=False),
    ),
    "interim-1xx": (
        [{"send": "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"},
         {"send": OK_HEAD + "content-length: 2\r\n\r\nok"}],
        Answer(200, body=b"ok", complete=True),
    ),
    "trailers": (
        [{"send": CHUNKED_HEAD + "5\r\nhello\r\n0\r\nx-checksum: 1\r\n\r\n"}],
        Answer(200, body=b"hello", complete=True),
    ),
    "connection-close": (
        [{"send": OK_HEAD + "content-length: 2\r\nconnection: close\r\n\r\nok"}, {"close": True}],
        Answer(200, body=b"ok", complete=True),
    ),
    "chunk-edges": (
        [{"send": CHUNKED_HEAD + "5;ext=1\r\nhello\r\nA\r\n0123456789\r\n1\r\n!\r\n"}, {"sleep": 0.1},
         {"send": "0\r\n\r\n"}],
        Answer(200, body=b"hello0123456789!", complete=True),
    ),
    "slow-head": (
        [{"send": "HTTP/1.1 200 OK\r\n"}, {"sleep": 0.3}, {"send": "content-type: text/plain\r\n"}, {"sleep": 0.3},
         {"send": "content-length: 4\r\n\r\n"}, {"sleep": 0.3}, {"send": "done"}],
        Answer(200, body=b"done", complete=True),
    ),
    "until-close": (
        [{"send": "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it"}, {"close": True}],
        Answer(200, body=b"all of it", complete=True),
    ),
    "error-status": (
        [{"send": OK_HEAD.replace("200 OK", "400 Bad Request") + 'content-length: 11\r\n\r\n{"error":1}'}],
        Answer(400, body=b'{"error":1}', complete=True),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_what_the_client_gets_and_what_the_instance_sees(peer: LauncherProcess, case: str) -> None:
    steps, expected = CASES[case]
    before = posts_seen(peer)
    counted = metric(peer, "launcher_front_door_requests_total", model="peer", status=str(expected.status))
    answer = raw_request(peer, script(*steps))
    assert (answer.status, answer.body, answer.complete) == (expected.status, expected.body, expected.complete)
    if expected.status == 200:
        assert answer.headers.get("content-type") in ("application/json", "text/plain")
    assert posts_seen(peer) - before == 1  # this request, once
    assert metric(peer, "launcher_front_door_requests_total", model="peer", status=str(expected.status)) == counted + 1
    assert "Exception in ASGI application" not in peer.output_text()
    assert "Traceback" not in peer.output_text()


def test_a_stream_of_events_cut_off_ends_with_an_error_event(peer: LauncherProcess) -> None:
    before = posts_seen(peer)
    answer = raw_request(peer, script({"send": SSE_HEAD + "9\r\ndata: 1\n\n\r\n"}, {"close": True}))
    assert answer.status == 200 and answer.complete
    events = answer.body.decode().split("\n\n")
    assert events[0] == "data: 1" and json.loads(events[1].removeprefix("data: "))["error"]["code"] == "upstream_failed"
    assert posts_seen(peer) - before == 1


@pytest.mark.parametrize("how", ["close", "stall"])
def test_an_instance_that_takes_the_request_and_never_answers_gets_it_once(peer: LauncherProcess, how: str) -> None:
    before = posts_seen(peer)
    started = time.monotonic()
    steps = [{"close": True}] if how == "close" else [{"sleep": 3 * READ_TIMEOUT}]
    answer = raw_request(peer, script(*steps))
    waited = time.monotonic() - started
    assert answer.status == 502 and answer.complete
    assert json.loads(answer.body)["error"]["code"] == "upstream_unreachable"
    if how == "stall":
        assert waited < 2.5 * READ_TIMEOUT  # one read timeout, not one per attempt
    time.sleep(0.2)
    assert posts_seen(peer) - before == 1
    assert model_state(peer, "peer")["state"] == "ready"  # it lives: not taken for dead


def test_the_instances_idle_close_never_reaches_a_client(peer: LauncherProcess) -> None:
    """The stand-in closes idle connections after 0.5 s here (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, as vLLM's uvicorn: 5 s)."""
    before = posts_seen(peer)
    for pause in (0.0, 0.6, 0.0, 1.0, 0.45, 0.55):
        time.sleep(pause)
        answer = peer.client.post("/v1/completions", json={"model": "peer", "prompt": "hi"})
        assert answer.status_code == 200, answer.text
    assert posts_seen(peer) - before == 6


def test_curl_sees_a_cut_answer_as_cut(peer: LauncherProcess, tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_text(json.dumps(script({"send": OK_HEAD + "content-length: 1000\r\n\r\n0123456789"}, {"close": True})))
    done = subprocess.run(["curl", "-sS", "-o", str(tmp_path / "out"), "-H", "content-type: application/json",
                           "--data-binary", f"@{body}", f"{peer.base_url}/v1/completions"],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert done.returncode == 18, done.stderr  # CURLE_PARTIAL_FILE: "transfer closed with ... remaining"
    assert (tmp_path / "out").read_bytes() == b"0123456789"
    body.write_text(json.dumps(script({"send": CHUNKED_HEAD + "5;x=y\r\nhello\r\n0\r\nx-t: 1\r\n\r\n"})))
    done = subprocess.run(["curl", "-sS", "-H", "content-type: application/json", "--data-binary", f"@{body}",
                           f"{peer.base_url}/v1/completions"], capture_output=True, timeout=30, check=False)  # fmt: skip
    assert (done.returncode, done.stdout) == (0, b"hello")


def test_the_openai_sdk_reads_a_cut_stream_as_an_error(peer: LauncherProcess) -> None:
    event = 'data: {"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": "a"}]}\n\n'
    client = openai.OpenAI(base_url=f"{peer.base_url}/v1", api_key="none", max_retries=0)
    stream = client.completions.create(
        model="peer", prompt="hi", stream=True,
        extra_body={"script": [{"send": SSE_HEAD + f"{len(event):x}\r\n{event}\r\n"}, {"close": True}]},
    )  # fmt: skip
    texts = []
    with pytest.raises(openai.APIError, match="in the middle of its answer"):
        for chunk in stream:
            texts.append(chunk.choices[0].text)
    assert texts == ["a"]


def test_a_connection_is_never_reused_near_the_instances_keepalive(tmp_path: Path) -> None:
    """An instance whose keep-alive is 2.2 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE): the proxy reuses a
    connection only while idle for less than 0.2 s (2 s of margin), so pauses around 2.2 s, where the
    instance closes its side, never reach a client; pauses under 0.2 s still reuse."""
    models = 'models:\n  ka: {options: "--model K --fast", env_vars: {VLLM_HTTP_TIMEOUT_KEEP_ALIVE: "2.2"}}\n'
    with front_door(tmp_path, models) as launcher:
        assert launcher.client.post("/v2/vllm/models/ka/start", timeout=30).status_code == 200
        instance = launcher.state(str(model_state(launcher, "ka")["instance_id"]))

        def posts() -> int:
            return int(httpx.get(f"http://127.0.0.1:{instance['port']}/requests", timeout=5).json()["posts"])

        before, reused = posts(), metric(launcher, "launcher_front_door_upstream_connections_total", connection="reused")
        pauses = [2.15, 0.05, 2.2, 2.25, 0.1, 2.18]
        for pause in pauses:
            time.sleep(pause)
            answer = launcher.client.post("/v1/completions", json={"model": "ka", "prompt": "x"})
            assert answer.status_code == 200, (pause, answer.text)
        assert posts() - before == len(pauses)
        now_reused = metric(launcher, "launcher_front_door_upstream_connections_total", connection="reused")
        assert now_reused - reused == 2  # after the two short pauses


def test_a_stray_answer_while_idle_never_reaches_the_next_client(peer: LauncherProcess) -> None:
    """An instance that answers, then sends a second answer nobody asked for: the connection is
    dropped, and the next client gets its own answer, not the stray one."""
    first = raw_request(peer, script({"send": OK_HEAD + "content-length: 2\r\n\r\nok"}, {"sleep": 0.15},
                                     {"send": OK_HEAD + "content-length: 4\r\n\r\nEVIL"}))  # fmt: skip
    assert (first.status, first.body) == (200, b"ok")
    time.sleep(0.3)  # the stray arrives while the connection waits in the pool
    second = raw_request(peer, {"model": "peer", "prompt": "hi"})
    assert second.status == 200 and json.loads(second.body)["object"] == "standin", second.body


def test_switching_protocols_is_a_502_said_once(peer: LauncherProcess) -> None:
    before = posts_seen(peer)
    answer = raw_request(peer, script({"send": "HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n"
                                               "connection: upgrade\r\n\r\nraw bytes"}, {"sleep": 0.2}))  # fmt: skip
    assert answer.status == 502 and "switched protocols" in json.loads(answer.body)["error"]["message"]
    assert posts_seen(peer) - before == 1
    assert "Traceback" not in peer.output_text() and "Fatal error" not in peer.output_text()


def test_a_stray_answer_right_behind_the_real_one_is_dropped_with_its_connection(peer: LauncherProcess) -> None:
    first = raw_request(peer, script({"send": OK_HEAD + "content-length: 2\r\n\r\nok"
                                      + OK_HEAD + "content-length: 4\r\n\r\nEVIL"}))  # one write: one packet
    assert (first.status, first.body, first.complete) == (200, b"ok", True)
    second = raw_request(peer, {"model": "peer", "prompt": "hi"})
    assert second.status == 200 and json.loads(second.body)["object"] == "standin", second.body
    assert "Traceback" not in peer.output_text()
