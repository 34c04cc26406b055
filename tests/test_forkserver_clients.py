"""The forkserver survives any client on its socket: oversized, garbage, NaN, slow readers, big hellos.

A standalone stand-in forkserver with a running instance; hostile clients speak raw bytes to its
socket. After each, the instance still runs and another client is answered at once.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forkserver import protocol
from tests.launcher_process import REPO, LauncherProcess, free_port, process_alive, wait_until


class Peer:
    """A raw client of the forkserver's socket (each is closed by the ``node`` fixture at the end)."""

    opened: list[Peer] = []

    def __init__(self, path: str) -> None:
        Peer.opened.append(self)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self._buffer = protocol.FrameBuffer()
        self._pending: list[dict[str, Any]] = []
        self._next_id = 0

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_body(self, body: bytes) -> None:
        self.send_raw(struct.pack(">I", len(body)) + body)

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        self._next_id += 1
        self.send_raw(protocol.encode({"op": op, "id": self._next_id, **fields}))
        return self.reply(self._next_id)

    def reply(self, request_id: Any = None) -> dict[str, Any]:
        while True:
            for message in self._pending:
                if "event" not in message and (request_id is None or message.get("id") == request_id):
                    self._pending.remove(message)
                    return message
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the forkserver closed the connection")
            self._pending += self._buffer.feed(chunk)

    def closed_by_server(self) -> bool:
        try:
            while self.sock.recv(1 << 16):
                pass
        except (ConnectionError, TimeoutError):
            return False
        return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def node() -> Iterator[tuple[str, subprocess.Popen[bytes], dict[str, Any]]]:
    """A standalone stand-in forkserver with one running instance ``keep``."""
    workdir = Path(tempfile.mkdtemp(prefix="fs-hostile-"))
    path = str(workdir / "run" / "fs.sock")
    process = subprocess.Popen(
        [sys.executable, "-m", "forkserver", "--socket", path, "--workload", "standin"],
        cwd=REPO, stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, "TMPDIR": str(workdir)},
    )  # fmt: skip
    try:
        wait_until(lambda: os.path.exists(path), 30, what="the forkserver's socket")
        peer = Peer(path)
        keep = peer.request(
            "spawn", instance_id="keep", argv=["--model", "K", "--port", str(free_port())],
            log_path=str(workdir / "keep.log"), meta={},
        )  # fmt: skip
        assert keep["ok"], keep
        peer.close()
        yield path, process, keep
    finally:
        for peer in Peer.opened:
            peer.close()
        Peer.opened.clear()
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)


def _still_serving(path: str, process: subprocess.Popen[bytes], keep: dict[str, Any]) -> None:
    assert process.poll() is None, "the forkserver exited"
    peer = Peer(path)
    try:
        hello = peer.request("hello")
        assert hello["ok"] and "keep" in {item["instance_id"] for item in hello["instances"]}
    finally:
        peer.close()
    assert process_alive(keep["pid"]), "its instance was lost"


@pytest.mark.parametrize(
    "frame",
    [
        struct.pack(">I", protocol.MAX_FRAME + 1) + b"x",  # oversized
        struct.pack(">I", 9) + b"not json!",  # garbage
        struct.pack(">I", 5) + b"[1,2]",  # JSON, not an object
        struct.pack(">I", 200_000) + b"[" * 100_000 + b"]" * 100_000,  # nested past the recursion limit
    ],
    ids=["oversized", "garbage", "not-an-object", "deeply-nested"],
)
def test_a_bad_frame_drops_that_client_only(node: Any, frame: bytes) -> None:
    path, process, keep = node
    other = Peer(path)  # connected all along: never waited for, never dropped
    bad = Peer(path)
    bad.send_raw(frame)
    answer = bad.reply()
    assert answer["ok"] is False and answer["kind"] == "invalid"
    assert bad.closed_by_server()
    assert other.request("hello")["ok"]
    _still_serving(path, process, keep)


@pytest.mark.parametrize(
    ("op", "body"),
    [
        ("stop", b'{"op": "stop", "id": 1, "instance_id": "keep", "grace_seconds": NaN}'),
        ("stop", b'{"op": "stop", "id": 1, "instance_id": "keep", "grace_seconds": Infinity}'),
        ("stop", b'{"op": "stop", "id": 1, "instance_id": "keep", "grace_seconds": -1}'),
        ("stop", b'{"op": "stop", "id": 1, "instance_id": "keep", "grace_seconds": true}'),
        ("shutdown", b'{"op": "shutdown", "id": 1, "grace_seconds": NaN}'),
        ("hello", b'{"op": "hello", "id": 1, "offset": -3}'),
        ("spawn", b'{"op": "spawn", "id": 1, "instance_id": "n", "argv": ["--model", "M"], "log_path": "/tmp/n.log", '
                  b'"nice": 1e400}'),
    ],
    ids=["nan-grace", "infinite-grace", "negative-grace", "bool-grace", "nan-shutdown", "negative-offset", "huge-nice"],
)
def test_numbers_that_are_not_finite_and_in_range_are_refused(node: Any, op: str, body: bytes) -> None:
    path, process, keep = node
    peer = Peer(path)
    peer.send_body(body)
    answer = peer.reply(1)
    assert answer["ok"] is False and answer["kind"] == "invalid", answer
    time.sleep(0.2)  # a stop that slipped through would be under way now
    _still_serving(path, process, keep)


def test_a_client_that_stops_reading_is_dropped_not_waited_for(node: Any) -> None:
    path, process, keep = node
    slow = Peer(path)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = protocol.encode({"op": "hello", "id": 0})
    other = Peer(path)
    started = time.monotonic()
    with pytest.raises(OSError):  # the forkserver hangs up on it once its replies pile up
        for _ in range(200_000):
            slow.send_raw(request)
    assert other.request("hello")["ok"]  # the loop never blocked on the slow one
    assert time.monotonic() - started < 120
    _still_serving(path, process, keep)


def test_a_hello_too_big_for_one_frame_comes_in_pages(node: Any) -> None:
    path, process, keep = node
    peer = Peer(path)
    big = {"config": {"options": "--model K", "annotations": {"note": "é" * 60_000}}}  # 360 KB once escaped
    for number in range(6):
        reply = peer.request(
            "spawn", instance_id=f"big{number}", argv=["--model", "K", "--port", str(free_port())],
            log_path=f"{os.path.dirname(path)}/big{number}.log", meta=big,
        )  # fmt: skip
        assert reply["ok"], reply
    first = peer.request("hello")
    assert first["ok"] and "next_offset" in first  # more than one frame's worth
    seen, page = [item["instance_id"] for item in first["instances"]], first
    while "next_offset" in page:
        page = peer.request("hello", offset=page["next_offset"])
        seen += [item["instance_id"] for item in page["instances"]]
    assert sorted(seen) == sorted(["keep", *(f"big{number}" for number in range(6))])
    # A launcher attaching to it gets every instance, pages and all.
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_FORKSERVER_SOCKET": path})
    try:
        listed = {item["instance_id"] for item in launcher.client.get("/v2/vllm/instances").json()["instances"]}
        assert {f"big{number}" for number in range(6)} <= listed
        assert launcher.state("big0")["annotations"]["note"] == "é" * 60_000
    finally:
        launcher.stop()
    _still_serving(path, process, keep)
