"""Defects an outside review reproduced on the front door, each on a real launcher (stand-in workload).

A dead instance, awake or asleep, is never the client's problem: the next request starts the
model afresh. A profile deleted and added again is another model than its namesake still
stopping: it never starts beside it on the same GPU.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.launcher_process import LauncherProcess, wait_until
from tests.test_front_door_standin import ask, front_door, metric, model_state

GPU = {"LAUNCHER_MOCK_GPUS": "1", "LAUNCHER_MOCK_GPU_COUNT": "1"}


def _instance(launcher: LauncherProcess, model: str) -> dict[str, object]:
    return launcher.state(str(model_state(launcher, model)["instance_id"]))


def _kill(launcher: LauncherProcess, instance: dict[str, object]) -> None:
    """SIGKILL the instance's whole process group, then wait until the launcher knows it is gone."""
    os.killpg(int(str(instance["pid"])), signal.SIGKILL)

    def gone() -> bool:  # stopped, or already removed by the front door (its reaper saw it dead)
        answer = launcher.client.get(f"/v2/vllm/instances/{instance['instance_id']}")
        return answer.status_code == 404 or answer.json()["status"] == "stopped"

    wait_until(gone, 10, 0.01, "stopped")


def test_a_crashed_instance_means_a_fresh_start_for_the_next_request(tmp_path: Path) -> None:
    with front_door(tmp_path, 'models:\n  m: {options: "--model M"}\n') as launcher:
        assert ask(launcher, "m").status_code == 200
        first = _instance(launcher, "m")
        with launcher.client.stream("POST", "/v1/completions", timeout=30,
                                    json={"model": "m", "stream": True, "chunks": 50, "interval": 0.1}) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            os.killpg(int(str(first["pid"])), signal.SIGKILL)  # mid-stream
            rest = list(lines)  # the stream ends, cut
        assert "data: [DONE]" not in rest
        answer = ask(launcher, "m")  # at once: before the reaper can notice
        assert answer.status_code == 200, answer.text
        assert _instance(launcher, "m")["instance_id"] != first["instance_id"]
        assert metric(launcher, "launcher_front_door_starts_total", model="m", outcome="ready") == 2


def test_a_request_between_a_crash_and_its_report_starts_the_model_afresh(tmp_path: Path) -> None:
    with front_door(tmp_path, 'models:\n  m: {options: "--model M"}\n') as launcher:
        assert ask(launcher, "m").status_code == 200
        first = _instance(launcher, "m")
        os.killpg(int(str(first["pid"])), signal.SIGKILL)
        answers = [ask(launcher, "m") for _ in range(3)]  # the first one races the forkserver's report
        assert [answer.status_code for answer in answers] == [200] * 3, [answer.text for answer in answers]


def test_a_sleeping_model_whose_instance_died_starts_afresh(tmp_path: Path) -> None:
    models = 'models:\n  nap: {options: "--model N --gpu-memory-utilization 0.5", idle: sleep, idle_timeout: 1}\n'
    with front_door(tmp_path, models, **GPU) as launcher:
        for attempt in range(3):
            assert ask(launcher, "nap").status_code == 200
            wait_until(lambda: model_state(launcher, "nap")["state"] == "sleeping", 20, what="asleep")
            _kill(launcher, _instance(launcher, "nap"))
            answer = ask(launcher, "nap")  # before the reaper's next look, most times
            assert answer.status_code == 200, f"try {attempt}: {answer.text}"


def test_a_re_added_profile_never_starts_beside_its_namesake_on_one_gpu(tmp_path: Path) -> None:
    models = 'models:\n  g: {options: "--model G", gpu_uuids: [GPU-0]}\n'
    with front_door(tmp_path, models, **GPU) as launcher:
        most, stop = [0], threading.Event()

        def watch_gpu() -> None:
            with httpx.Client(base_url=launcher.base_url, timeout=10) as client:
                while not stop.is_set():
                    gpus = client.get("/v2/vllm/gpus").json()["gpus"]
                    most[0] = max(most[0], len(gpus[0]["instances"]))
                    time.sleep(0.02)

        def stream() -> int:
            body = {"model": "g", "prompt": "hi", "stream": True, "chunks": 20, "interval": 0.1}
            with httpx.Client(base_url=launcher.base_url, timeout=30) as client:
                return len(client.post("/v1/completions", json=body).text.splitlines())

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            watcher = pool.submit(watch_gpu)
            streaming = pool.submit(stream)
            wait_until(lambda: model_state(launcher, "g")["in_flight"] == 1, 10, what="streaming")
            deleting = pool.submit(launcher.client.delete, "/v2/vllm/models/g", timeout=30)
            wait_until(lambda: launcher.client.get("/v2/vllm/models/g").status_code == 404, 10, what="deleted")
            assert launcher.client.put("/v2/vllm/models/g", json={"options": "--model G", "gpu_uuids": ["GPU-0"]}
                                       ).status_code == 201  # fmt: skip
            again = ask(launcher, "g")  # waits for the old instance to leave GPU-0
            stop.set()
            watcher.result()
            assert streaming.result() > 20 and deleting.result().status_code == 200
        assert again.status_code == 200, again.text
        assert most[0] == 1, "two instances held GPU-0 at once"


@pytest.mark.parametrize("how", ["stop", "delete", "replace"])
def test_a_cancelled_start_holds_its_gpu_until_its_instance_is_gone(tmp_path: Path, how: str) -> None:
    """A start cancelled while its instance hangs on SIGTERM (vLLM does while it starts): the instance
    holds GPU-0 until it is gone, whatever the model's state says meanwhile."""
    models = ('models:\n  a: {options: "--model A --startup-delay 30", gpu_uuids: [GPU-0]}\n'
              '  b: {options: "--model B", gpu_uuids: [GPU-0]}\n')  # fmt: skip
    with front_door(tmp_path, models, LAUNCHER_STOP_TIMEOUT_STARTING="3", **GPU) as launcher:
        most, stop = [0], threading.Event()

        def watch_gpu() -> None:
            with httpx.Client(base_url=launcher.base_url, timeout=10) as client:
                while not stop.is_set():
                    most[0] = max(most[0], len(client.get("/v2/vllm/gpus").json()["gpus"][0]["instances"]))
                    time.sleep(0.02)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            watcher = pool.submit(watch_gpu)
            starting = pool.submit(launcher.client.post, "/v2/vllm/models/a/start", timeout=60)
            wait_until(lambda: model_state(launcher, "a")["instance_id"], 20, what="a's instance created")
            cancel = {
                "stop": lambda: launcher.client.post("/v2/vllm/models/a/stop", timeout=60),
                "delete": lambda: launcher.client.delete("/v2/vllm/models/a", timeout=60),
                "replace": lambda: launcher.client.put("/v2/vllm/models/a", timeout=60,
                                                       json={"options": "--model A2", "gpu_uuids": ["GPU-0"]}),
            }[how]  # fmt: skip
            cancelling = pool.submit(cancel)
            time.sleep(0.3)
            answer = ask(launcher, "b")  # waits until a's instance is gone
            stop.set()
            watcher.result()
            starting.result()
            cancelling.result()
        assert answer.status_code == 200, answer.text
        assert most[0] == 1, "two instances held GPU-0 at once"


def test_a_kept_alive_stream_hears_from_a_fresh_start_after_a_crash(tmp_path: Path) -> None:
    models = 'models:\n  m: {options: "--model M --startup-delay 4", start_keepalive: true}\n'
    with front_door(tmp_path, models) as launcher:
        lines: list[tuple[float, str]] = []
        started = time.monotonic()

        def read() -> None:
            body = {"model": "m", "prompt": "hi", "stream": True, "delay": 3}  # 3 s before the instance answers
            with httpx.Client(timeout=httpx.Timeout(60, read=None)) as client, client.stream(
                "POST", f"{launcher.base_url}/v1/completions", json=body
            ) as stream:
                lines.extend((time.monotonic() - started, line) for line in stream.iter_lines() if line)

        reader = threading.Thread(target=read)
        reader.start()
        wait_until(lambda: model_state(launcher, "m")["state"] == "ready", 30, what="ready")
        time.sleep(1.0)  # the request is in the instance, which has not answered yet
        killed = time.monotonic() - started
        os.killpg(int(str(_instance(launcher, "m")["pid"])), signal.SIGKILL)
        reader.join(60)
        during = [line for at, line in lines if line.startswith(":") and at > killed + 1]
        assert during, lines  # the fresh start (4 s) was not silent
        assert any(line.startswith("data: ") and "chunk" in line for _, line in lines), lines


def test_a_client_that_stops_reading_does_not_hold_its_model_for_ever(tmp_path: Path) -> None:
    """It takes the head, then nothing: after --proxy-read-timeout its answer is cut, its hold on the
    model goes, and the model stops when idle."""
    models = 'idle_timeout: 1\nmodels:\n  m: {options: "--model M --fast"}\n'
    with front_door(tmp_path, models, LAUNCHER_PROXY_READ_TIMEOUT="2") as launcher:
        payload = json.dumps({"model": "m", "prompt": "x", "stream": True, "chunks": 300_000}).encode()
        with socket.create_connection(("127.0.0.1", launcher.port)) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                           + f"content-length: {len(payload)}\r\n\r\n".encode() + payload)  # fmt: skip
            assert client.recv(1024).startswith(b"HTTP/1.1 200")
            wait_until(lambda: model_state(launcher, "m")["in_flight"] == 1, 10, what="in flight")
            # The client reads nothing more.
            wait_until(lambda: model_state(launcher, "m")["in_flight"] == 0, 20, what="the stalled answer cut")
            wait_until(lambda: model_state(launcher, "m")["state"] == "stopped", 20, what="idle stop")
        assert "took nothing of its answer for 2s: cut" in launcher.output_text()
        assert "Traceback" not in launcher.output_text()


def test_the_stalled_client_sweep_works_in_a_second_event_loop() -> None:
    """The sweep's timer belongs to a loop: one left from an ended loop must not switch it off."""
    import asyncio

    from launcher.frontdoor import proxy

    async def never_drains(_: object) -> None:
        await asyncio.sleep(3600)

    async def relay(timeout: float, seen: list[bool]) -> None:  # as _relay: the guard in the sending task
        stall = proxy._ClientStall(timeout)  # noqa: SLF001 - the guard under test
        seen.append(False)
        try:
            await stall.send(never_drains, {})
        finally:
            seen[0] = stall.stalled

    async def stalled(timeout: float) -> bool:
        seen: list[bool] = []
        task = asyncio.ensure_future(relay(timeout, seen))
        await asyncio.wait({task}, timeout=timeout + 2.0)
        task.cancel()
        return seen == [True]

    async def leave_a_send_behind() -> None:
        asyncio.ensure_future(relay(30, []))
        await asyncio.sleep(0.05)  # the loop ends with the send (and the sweep's timer) pending

    asyncio.run(leave_a_send_behind())
    assert asyncio.run(stalled(0.5))
