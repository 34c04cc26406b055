"""Starts the forkserver (or attaches to one started on its own), and restarts or reconnects.

Two modes:

- *own* (default): the API starts ``python -m forkserver`` as its child; the forkserver and
  every instance die with the API; if the forkserver dies, a new one is started.
- *external* (setting ``forkserver_socket``): someone started ``python -m forkserver --socket
  PATH`` on its own. The API attaches to it, adopts its instances, leaves them running when the
  API stops, and reconnects if the connection drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from launcher.settings import Settings
from launcher.supervisor.client import EventHandler, ForkserverClient, ForkserverGone

log = logging.getLogger("launcher.forkserver")
CONNECT_POLL = 0.05
# A forkserver that never got ready fails the same way each time (no compiler, a broken vLLM, a
# workload that does not import): after this many starts in a row the launcher gives up and says why.
START_ATTEMPTS = 3
STDERR_TAIL_LINES = 20


class StderrRelay:
    """Copies the forkserver's stderr to ours, keeping its last lines to say why it failed.

    A thread, not the event loop: the forkserver's output keeps flowing while the loop is busy.
    """

    def __init__(self) -> None:
        self._read_fd, self.write_fd = os.pipe()
        self._lines: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._thread = threading.Thread(target=self._copy, name="forkserver-stderr", daemon=True)
        self._thread.start()

    def child_started(self) -> None:
        """Close our copy of the write end: the pipe ends when the forkserver's copies close."""
        os.close(self.write_fd)

    def _copy(self) -> None:
        partial = b""
        try:
            while chunk := os.read(self._read_fd, 65536):
                with contextlib.suppress(OSError):  # our stderr closed: keep draining the pipe
                    _write_all(2, chunk)
                partial += chunk
                *lines, partial = partial.split(b"\n")
                self._lines.extend(line.decode(errors="replace").rstrip() for line in lines)
                partial = partial[-4096:]
        finally:
            if partial:
                self._lines.append(partial.decode(errors="replace").rstrip())
            os.close(self._read_fd)

    def drain(self, wait: float = 2.0) -> None:
        """Wait (up to ``wait`` seconds) until everything the exited forkserver wrote is copied."""
        self._thread.join(wait)

    def last_line(self, wait: float = 2.0) -> str:
        """The forkserver's last non-empty line (once it exited: what it said as it went)."""
        self.drain(wait)
        return next((line for line in reversed(self._lines) if line.strip()), "")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class ForkserverSupervisor:
    """Owns the forkserver process for the lifetime of the API.

    ``on_event`` receives the forkserver's events; ``on_lost`` runs after the forkserver went
    away (before a new one starts), so the caller can mark its instances stopped.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        on_event: EventHandler,
        on_lost: Callable[[str], Awaitable[None]],
        on_connected: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        self._settings = settings
        self._on_event = on_event
        self._on_lost = on_lost
        self._on_connected = on_connected
        self.external = bool(settings.forkserver_socket)
        self._own_runtime_dir = not settings.runtime_dir and not self.external
        if self.external:
            self.runtime_dir = os.path.dirname(os.path.abspath(settings.forkserver_socket))
            self.socket_path = os.path.abspath(settings.forkserver_socket)
        else:
            self.runtime_dir = settings.runtime_dir or tempfile.mkdtemp(prefix="vllm-launcher-")
            os.makedirs(self.runtime_dir, mode=0o700, exist_ok=True)
            os.chmod(self.runtime_dir, 0o700)
            self.socket_path = os.path.join(self.runtime_dir, "forkserver.sock")
        self._process: asyncio.subprocess.Process | None = None
        self._client: ForkserverClient | None = None
        self._ready = asyncio.Event()
        self._stopping = False
        self._monitor: asyncio.Task[None] | None = None
        self.hello: dict[str, Any] = {}
        self.restarts = 0
        self.last_error = ""
        self._relay: StderrRelay | None = None
        self._ever_ready = False
        self._failed_starts = 0  # in a row, before the first ready forkserver
        self.gave_up = asyncio.Event()  # set (with last_error) when the launcher should stop

    @property
    def ready(self) -> bool:
        """True while a forkserver is connected and accepting requests."""
        return self._ready.is_set()

    def start(self) -> None:
        """Start the forkserver in the background (the API serves meanwhile)."""
        self._monitor = asyncio.create_task(self._run(), name="forkserver-monitor")

    async def client(self) -> ForkserverClient:
        """The connected client, waiting for a start-up in progress."""
        if self._stopping:
            raise ForkserverGone("the launcher is shutting down")
        try:
            await asyncio.wait_for(self._ready.wait(), self._settings.forkserver_start_timeout)
        except TimeoutError:
            raise ForkserverGone(f"the forkserver is not available: {self.last_error or 'still starting'}") from None
        assert self._client is not None
        return self._client

    async def _run(self) -> None:
        while not self._stopping:
            try:
                if self.external:
                    await self._attach()
                else:
                    await self._start_once()
                await self._on_connected(self.hello)
                self._ready.set()
                self._ever_ready = True
                self._failed_starts = 0
            except Exception as exc:  # noqa: BLE001 - keep trying; /health shows the error
                self.last_error = f"forkserver {'unreachable' if self.external else 'failed to start'}: {exc}"
                await self._kill_process()
                self._ready.clear()
                self._failed_starts += 1
                if not self.external and not self._ever_ready and self._failed_starts >= START_ATTEMPTS:
                    # Restarting forever would leave /health at 503 with the reason scrolled away.
                    self.last_error = f"the forkserver failed to start {self._failed_starts} times in a row, " \
                        f"the last time: {exc}"  # fmt: skip
                    log.error("%s; stopping the launcher", self.last_error)
                    self.gave_up.set()
                    return
                log.error("%s", self.last_error)
                await asyncio.sleep(1.0)
                continue
            assert self._client is not None
            waits: set[asyncio.Task[Any]] = {asyncio.create_task(self._client.closed.wait())}
            if self._process is not None:
                waits.add(asyncio.create_task(self._process.wait()))
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            self._ready.clear()
            for task in waits:
                task.cancel()
            if self._stopping:
                return
            await self._kill_process()
            if self.external:
                self.last_error = "lost the connection to the forkserver"
            else:
                code = self._process.returncode if self._process is not None else None
                self.last_error = f"forkserver exited unexpectedly (code {code})"
            log.error("%s; %s", self.last_error, "reconnecting" if self.external else "starting a new one")
            await self._on_lost(self.last_error)
            self.restarts += 1

    @staticmethod
    async def _hello(client: ForkserverClient) -> dict[str, Any]:
        """The forkserver's hello with every instance: it comes a page at a time (``next_offset``)."""
        hello: dict[str, Any] = await client.request("hello")
        while "next_offset" in hello:
            page = await client.request("hello", offset=hello.pop("next_offset"))
            hello["instances"] = [*hello.get("instances", []), *page.get("instances", [])]
            if "next_offset" in page:
                hello["next_offset"] = page["next_offset"]
        return hello

    async def _attach(self) -> None:
        self._client = await ForkserverClient.connect(self.socket_path, self._on_event)
        self.hello = await self._hello(self._client)
        self.last_error = ""
        log.info("attached to forkserver pid %s at %s", self.hello.get("pid"), self.socket_path)

    async def _start_once(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        # The instances' temp dirs live here. A forkserver that was killed could not remove its
        # own; its instances died with it, so what is left belongs to nobody.
        instances_tmp = os.path.join(self.runtime_dir, "instances")
        await asyncio.to_thread(shutil.rmtree, instances_tmp, True)
        command = [
            self._settings.forkserver_python,
            "-m",
            "forkserver",
            "--socket",
            self.socket_path,
            "--workload",
            self._settings.forkserver_workload,
            "--die-with-parent",
            str(os.getpid()),
            "--tmp-root",
            instances_tmp,
            "--fork-engine" if self._settings.fork_engine else "--no-fork-engine",
            "--in-process-worker" if self._settings.in_process_worker else "--no-in-process-worker",
            "--share-weights" if self._settings.share_weights else "--no-share-weights",
            "--inspect-models-in-fork" if self._settings.inspect_models_in_fork else "--no-inspect-models-in-fork",
            "--compile-cache-fix" if self._settings.compile_cache_fix else "--no-compile-cache-fix",
            # The launcher's own temp dir (the forkserver's TMPDIR is private): a later forkserver finds it.
            "--shm-ledger",
            os.path.join(tempfile.gettempdir(), f"vllm-launcher-{os.getuid()}", "shm-ledger"),
        ]
        if self._settings.forkserver_preload:
            command += ["--preload", self._settings.forkserver_preload]
        if self._settings.log_level.lower() == "debug":
            command.append("--verbose")
        started = time.monotonic()
        # A private TMPDIR: what torch and vLLM drop there at import goes when the runtime dir does.
        tmpdir = os.path.join(self.runtime_dir, "tmp")
        os.makedirs(tmpdir, mode=0o700, exist_ok=True)
        env = {**os.environ, "TMPDIR": tmpdir}
        self._relay = relay = StderrRelay()
        try:
            # Own session: a Ctrl-C meant for the API must not reach the forkserver directly.
            self._process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stderr=relay.write_fd, start_new_session=True, env=env
            )
        finally:
            relay.child_started()
        deadline = started + self._settings.forkserver_start_timeout
        while True:
            if self._process.returncode is not None:
                said = await asyncio.to_thread(relay.last_line)
                raise RuntimeError(
                    f"it exited with code {self._process.returncode} while preloading" + (f": {said}" if said else "")
                )
            if os.path.exists(self.socket_path):
                try:
                    self._client = await ForkserverClient.connect(self.socket_path, self._on_event)
                    break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"it did not listen within {self._settings.forkserver_start_timeout:.0f}s")
            await asyncio.sleep(CONNECT_POLL)
        self.hello = await self._hello(self._client)
        self.last_error = ""
        names = {"vllm": "vLLM", "standin": "the stand-in"}  # vLLM 0.32.0 preloaded in 15.1 s; ready on :8001
        workload = str(self.hello.get("workload", "the workload"))
        version = f" {self.hello['workload_version']}" if self.hello.get("workload_version") else ""
        log.info("%s%s preloaded in %.1f s; ready on :%d", names.get(workload, workload), version,
                 self.hello.get("preload_seconds", 0.0), self._settings.port)  # fmt: skip
        log.debug("forkserver pid %s ready in %.1f s", self.hello.get("pid"), time.monotonic() - started)

    async def _kill_process(self) -> None:
        if self._client is not None:
            await self._client.close()
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
            await process.wait()

    async def stop(self, grace_seconds: float) -> None:
        """Stop every instance (SIGTERM, deadline, SIGKILL), then the forkserver itself.

        An external forkserver is left running with its instances: only the connection closes.
        """
        self._stopping = True
        asked = False
        if self._client is not None and self._ready.is_set() and not self.external:
            with contextlib.suppress(ForkserverGone, Exception):
                await self._client.request("shutdown", grace_seconds=grace_seconds)
                asked = True
        process = self._process
        if process is not None and process.returncode is None and not asked:
            # Still preloading vLLM (or not answering): no instance of it exists yet, so nothing
            # is lost by ending it now rather than after the preload (Ctrl-C then takes a moment).
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), grace_seconds + 5.0)
            except TimeoutError:
                log.warning("forkserver did not exit in time; killing it")
        await self._kill_process()
        if self._relay is not None:
            await asyncio.to_thread(self._relay.drain)  # its last lines, before the launcher exits
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        self._ready.clear()
        if self.external:
            return
        shutil.rmtree(os.path.join(self.runtime_dir, "tmp"), ignore_errors=True)
        if self._own_runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
