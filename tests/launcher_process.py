"""Run a real launcher (``python -m launcher``) in a subprocess for tests and benchmarks.

It starts its own real forkserver. :meth:`LauncherProcess.stop` ends it and checks that every
process it started is gone, and removes its directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
SERVE_FLAGS = "--max-model-len 256 --enforce-eager --kv-cache-memory-bytes 32M"  # tiny and quick on CPU
# vLLM's default mode (torch.compile; CUDA graphs on a GPU): what `vllm serve` does without --enforce-eager.
DEFAULT_MODE_FLAGS = "--max-model-len 256 --kv-cache-memory-bytes 32M"
VLLM_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, awaiting its reaper, counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate: Any, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; raise AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def start_ready(launcher: LauncherProcess, instance_id: str, model: Path, **body: object) -> dict[str, Any]:
    """Create an instance of ``model`` (the tests' SERVE_FLAGS) and wait until it is ready; its state.
    An instance that stops meanwhile fails the test with the end of its log."""
    response = launcher.create(instance_id, options=f"--model {model} {SERVE_FLAGS}", **body)
    assert response.status_code == 201, response.text

    def ready() -> dict[str, Any] | bool:
        state = launcher.state(instance_id)
        assert state["status"] == "running", launcher.client.get(f"/v2/vllm/instances/{instance_id}/log").text[-3000:]
        return state["ready"] and state

    return wait_until(ready, 300, 0.25, f"{instance_id} ready")


def start_standalone_forkserver(socket_path: str) -> subprocess.Popen[bytes]:
    """A stand-in forkserver started on its own (as FMA's pods may run it), in its own session;
    the caller terminates it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "forkserver", "--socket", socket_path, "--workload", "standin"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: os.path.exists(socket_path), 30, what="the standalone forkserver")
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


def wait_instance_healthy(launcher: LauncherProcess, instance_id: str, port: int, timeout: float = 240.0) -> None:
    """Wait for the instance's own ``/health``; fail at once, with its log, if it stops."""

    def healthy() -> bool:
        state = launcher.state(instance_id)
        if state["status"] != "running":
            log = launcher.client.get(f"/v2/vllm/instances/{instance_id}/log").text
            raise AssertionError(f"instance stopped: {state}\n{log[-4000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, timeout, 0.25, f"{instance_id}'s /health")


class LauncherProcess:
    """A launcher subprocess with its own log and runtime directories."""

    def __init__(
        self,
        *,
        workload: str = "standin",
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 180.0,
        server: str | Sequence[str] = "launcher",
        tmpdir: Path | None = None,
        log_level: str = "warning",
        cwd: Path = REPO,
    ):
        """``server``: ``launcher`` (``python -m launcher``), ``uvicorn`` (``uvicorn launcher.app:app``), or a
        command that takes the same flags. ``log_level``: ``info`` is how ``make run`` starts it. ``cwd``:
        where it runs (the image's is ``/app``)."""
        self.env = dict(env or {})  # what the test set on top of os.environ
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="lt-"))
        self.log_dir = self.workdir / "logs"
        self.runtime_dir = self.workdir / "run"
        # A private TMPDIR: what the launcher (and anything it starts) leaves in "the" temp
        # directory is checked here, never in the machine's, which other processes share.
        self.tmpdir = tmpdir or self.workdir / "tmp"  # a test may hand in one it prepared
        self.tmpdir.mkdir(exist_ok=True)
        self.temp_leftovers: list[str] = []  # what was left in tmpdir, as stop() found it
        self.final_output = ""  # what the launcher printed, its stop included (set by stop())
        self.output = (self.workdir / "launcher.out").open("wb")
        child_env = {
            **os.environ,
            "LAUNCHER_FORKSERVER_WORKLOAD": workload,
            "LAUNCHER_LOG_DIR": str(self.log_dir),
            "LAUNCHER_RUNTIME_DIR": str(self.runtime_dir),
            "LAUNCHER_STOP_TIMEOUT": "5",
            "LAUNCHER_TEST_STRICT_LIFECYCLE": "1",  # a front-door transition its table lacks raises
            **(env or {}),
            "TMPDIR": str(self.tmpdir),
        }
        commands = {
            "launcher": [sys.executable, "-m", "launcher"],
            "uvicorn": [sys.executable, "-m", "uvicorn", "launcher.app:app"],
        }
        command = commands[server] if isinstance(server, str) else list(server)
        self.process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(self.port), "--log-level", log_level],
            cwd=cwd,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=self.output,
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.base_url, timeout=60.0)
        try:
            wait_until(self._healthy, ready_timeout, 0.1, "the launcher's /health")
        except BaseException:
            self.stop()
            raise

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"launcher exited with {self.process.returncode}:\n{self.output_text()}")
        try:
            return self.client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def output_text(self) -> str:
        """What the launcher (and its forkserver) printed."""
        return (self.workdir / "launcher.out").read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        """Every live process below the launcher (forkserver, instances, their helpers)."""
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def forkserver_pid(self) -> int:
        """The forkserver's pid (the launcher's only direct child)."""
        children = psutil.Process(self.process.pid).children()
        assert len(children) == 1, children
        return int(children[0].pid)

    def create(self, instance_id: str | None = None, **body: Any) -> httpx.Response:
        """POST (no id) or PUT (with id) an instance."""
        if instance_id is None:
            return self.client.post("/v2/vllm/instances", json=body)
        return self.client.put(f"/v2/vllm/instances/{instance_id}", json=body)

    def state(self, instance_id: str) -> dict[str, Any]:
        """GET one instance's state (asserting 200)."""
        response = self.client.get(f"/v2/vllm/instances/{instance_id}")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> list[int]:
        """End the launcher with ``sig``; return pids of processes that outlived it (killed here)."""
        tree = self.descendants()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        gone, alive = psutil.wait_procs(tree, timeout=10)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.client.close()
        self.output.close()
        with contextlib.suppress(FileNotFoundError):
            self.final_output = self.output_text()
        with contextlib.suppress(FileNotFoundError):
            self.temp_leftovers = sorted(os.listdir(self.tmpdir))
        shutil.rmtree(self.workdir, ignore_errors=True)
        return [process.pid for process in alive]


class WatchReader:
    """Reads a watch stream in a thread and keeps every event."""

    def __init__(self, launcher: LauncherProcess, params: dict[str, Any] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.status_code: int | None = None
        self.ended = threading.Event()
        self._client = httpx.Client(base_url=launcher.base_url, timeout=httpx.Timeout(60, read=None))
        self._thread = threading.Thread(target=self._read, args=(params or {},), daemon=True)
        self._thread.start()
        wait_until(lambda: self.status_code is not None, 10, what="the watch to open")

    def _read(self, params: dict[str, Any]) -> None:
        try:
            with self._client.stream("GET", "/v2/vllm/instances/watch", params=params) as response:
                self.status_code = response.status_code
                for line in response.iter_lines():
                    if line:
                        self.events.append(json.loads(line))
        except httpx.HTTPError:
            pass
        finally:
            self.ended.set()

    def types_for(self, instance_id: str) -> list[str]:
        return [event["type"] for event in self.events if event["object"].get("instance_id") == instance_id]

    def close(self) -> None:
        self._client.close()
