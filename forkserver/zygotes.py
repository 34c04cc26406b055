"""Zygotes: one process per model that holds its loaded weights, and from which its instances fork.

```
forkserver ── zygote "llama" (fork of the forkserver: loads the weights once, then only forks)
    ├─ instance a   ┐ forked from the zygote through a short-lived intermediate, so they are
    └─ instance b   ┘ the forkserver's children like any other instance: the same session,
                      death signal, reaping, stop and clean-up; every page of the weights shared
```

The forkserver starts a zygote for the first instance of a model that can share (the workload
says which can, and what "the same model" means: :meth:`share_key`), answers that spawn once
the zygote has loaded and forked the instance, and forks the model's later instances from the
same zygote in milliseconds. A zygote is a plain child of the forkserver: it dies with it, its
death takes no instance with it (they are not its children), and the next instance of its
model starts a new one. Until it is ready, and if it fails, instances fall back to an ordinary
fork (they load the weights themselves, as without sharing). It goes once the last instance
forked from it is gone (after ``linger`` seconds).

Inside the zygote, a request to fork becomes: fork an intermediate, which forks the instance
and exits at once; the instance, reparented to the forkserver (a child subreaper), waits for
the zygote's "go" (sent once the forkserver has its pid), then becomes an instance exactly as a
direct fork does (forkserver/child.py). A zygote that dies before "go" takes the would-be
instance with it (it sees the pipe close), so no process runs that the forkserver does not know.

The wire between the forkserver and a zygote is a SOCK_SEQPACKET pair: one JSON object per
packet; a fork request carries the instance's log file descriptor (SCM_RIGHTS).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import json
import os
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from forkserver import osutil
from forkserver.workload import ParsedOptions, Workload

MAX_PACKET = 1 << 20
REPARENT_TIMEOUT = 10.0  # seconds an instance waits for its intermediate to go
# A zygote that does not answer in time is given up (killed): what waits on it forks directly.
LOAD_TIMEOUT = float(os.environ.get("LAUNCHER_ZYGOTE_LOAD_TIMEOUT", "900"))  # its model loaded
FORK_TIMEOUT = 10.0  # an instance forked, once asked (a fork of a 2.6 GiB zygote: 0.2 s)
EXIT_ZYGOTE_FAILED = 3


@dataclass
class PendingSpawn:
    """A spawn the forkserver answers once a zygote has forked it (or it fell back to a direct fork)."""

    instance_id: str
    parsed: ParsedOptions
    env: dict[str, str]
    log_fd: int
    log_path: str
    tmpdir: str
    nice: int
    meta: dict[str, Any]
    shm_before: frozenset[Any]
    reply_to: Any  # the server's (client, request id)
    queued_at: float = field(default_factory=time.time)
    sent: bool = False  # the fork request is with the zygote
    sent_at: float | None = None  # monotonic time it was sent


@dataclass
class Zygote:
    key: str
    pid: int
    sock: socket.socket
    model: str
    tmpdir: str
    ready: bool = False
    load_start: float | None = None
    load_done: float | None = None
    queue: list[PendingSpawn] = field(default_factory=list)  # waiting, then sent (in order)
    instances: set[str] = field(default_factory=set)
    idle_since: float | None = None
    exit_code: int | None = None
    started_at: float = field(default_factory=time.monotonic)


class ZygotePool:
    """The forkserver's zygotes, by key. Driven by the server loop (single-threaded)."""

    def __init__(
        self,
        *,
        workload: Workload,
        base_env: Mapping[str, str],
        tmp_root: str,
        selector: selectors.BaseSelector,
        forked: Callable[[PendingSpawn, int, Zygote], None],
        fall_back: Callable[[PendingSpawn, str], None],
        linger: float = 0.0,
    ) -> None:
        self._workload = workload
        self._base_env = dict(base_env)
        self._tmp_root = tmp_root
        self._selector = selector
        self._forked = forked
        self._fall_back = fall_back
        self.linger = linger
        self._by_key: dict[str, Zygote] = {}
        self._by_pid: dict[int, Zygote] = {}

    # ------------------------------------------------------------------ forkserver side

    def key_for(self, parsed: ParsedOptions, env: Mapping[str, str]) -> str | None:
        """The workload's sharing key for these options and environment (None: no sharing)."""
        share_key = getattr(self._workload, "share_key", None)
        if share_key is None:
            return None
        try:
            key = share_key(parsed, env)
        except Exception as exc:  # noqa: BLE001 - sharing is an optimisation: never a failed spawn
            print(f"forkserver: no weight sharing for {parsed.model}: {exc}", file=sys.stderr, flush=True)
            return None
        return str(key) if key is not None else None

    def pending_ids(self) -> set[str]:
        return {spawn.instance_id for zygote in self._by_key.values() for spawn in zygote.queue}

    def take_back(self, which: Callable[[PendingSpawn], bool]) -> list[PendingSpawn]:
        """Take back the spawns ``which`` picks that no zygote has been asked to fork yet (still
        loading); a fork already asked finishes (0.2 s). A zygote left with nothing to do is retired."""
        taken = []
        for zygote in self._by_key.values():
            mine = [spawn for spawn in zygote.queue if not spawn.sent and which(spawn)]
            for spawn in mine:
                zygote.queue.remove(spawn)
            if mine and not zygote.queue and not zygote.instances:
                zygote.idle_since = time.monotonic()
            taken += mine
        return taken

    def zygotes(self) -> list[Zygote]:
        return list(self._by_key.values())

    def submit(self, key: str, spawn: PendingSpawn) -> None:
        """Queue ``spawn`` on the zygote for ``key``, started now if there is none."""
        zygote = self._by_key.get(key)
        if zygote is None:
            try:
                zygote = self._start(key, spawn)
            except OSError as exc:
                self._fall_back(spawn, f"could not start a zygote: {exc}")
                return
        zygote.idle_since = None
        zygote.queue.append(spawn)
        if zygote.ready:
            self._send_fork(zygote, spawn)

    def _start(self, key: str, spawn: PendingSpawn) -> Zygote:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tmpdir = tempfile.mkdtemp(prefix="z", dir=self._tmp_root)
        env = {**self._base_env, **spawn.env}
        sys.stdout.flush()
        sys.stderr.flush()
        forkserver_pid = os.getpid()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            ours.close()
            theirs.close()
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        if pid == 0:
            ours.close()
            zygote_main(theirs, self._workload, spawn.parsed, env, tmpdir, forkserver_pid, self._base_env)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        theirs.close()
        ours.setblocking(False)
        zygote = Zygote(key=key, pid=pid, sock=ours, model=spawn.parsed.model, tmpdir=tmpdir)
        self._by_key[key] = zygote
        self._by_pid[pid] = zygote
        self._selector.register(ours, selectors.EVENT_READ, "zygote")
        print(f"forkserver: zygote pid {pid} loads {spawn.parsed.model} for its instances", file=sys.stderr, flush=True)
        return zygote

    def _send_fork(self, zygote: Zygote, spawn: PendingSpawn) -> None:
        request = {
            "op": "fork",
            "instance_id": spawn.instance_id,
            "argv": spawn.parsed.argv,
            "parsed_at": spawn.parsed.parsed_at,
            "env": spawn.env,
            "tmpdir": spawn.tmpdir,
            "nice": spawn.nice,
            # The weights' load, as this instance waited for it (its `load` phase).
            "waited": [max(spawn.queued_at, zygote.load_start or spawn.queued_at), zygote.load_done]
            if zygote.load_done is not None and zygote.load_done > spawn.queued_at
            else None,
        }
        try:
            socket.send_fds(zygote.sock, [json.dumps(request).encode()], [spawn.log_fd])
            spawn.sent, spawn.sent_at = True, time.monotonic()
        except OSError as exc:
            zygote.queue.remove(spawn)
            self._fall_back(spawn, f"the zygote did not take the request: {exc}")

    def readable(self, sock: socket.socket) -> None:
        """Messages from a zygote: ready, failed, or the pid of an instance it forked."""
        zygote = next((z for z in self._by_key.values() if z.sock is sock), None)
        if zygote is None:
            return
        while True:
            try:
                data = sock.recv(MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._lost(zygote, "its connection closed")
                return
            try:
                message = json.loads(data)
            except ValueError:
                continue
            self._handle(zygote, message)

    def _handle(self, zygote: Zygote, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "ready":
            zygote.ready = True
            zygote.load_start, zygote.load_done = message.get("load_start"), message.get("load_done")
            print(
                f"forkserver: zygote pid {zygote.pid} holds {zygote.model} "
                f"(loaded in {float(message.get('seconds') or 0):.2f}s)",
                file=sys.stderr,
                flush=True,
            )
            for spawn in list(zygote.queue):
                if not spawn.sent:
                    self._send_fork(zygote, spawn)
        elif event == "failed":
            self._lost(zygote, f"it could not load the model: {message.get('error')}")
        elif event == "forked":
            done = next((s for s in zygote.queue if s.sent and s.instance_id == message.get("instance_id")), None)
            if done is None:
                return
            zygote.queue.remove(done)
            if message.get("pid"):
                zygote.instances.add(done.instance_id)
                os.close(done.log_fd)
                self._forked(done, int(message["pid"]), zygote)
            else:
                self._fall_back(done, f"the zygote could not fork it: {message.get('error')}")

    def _lost(self, zygote: Zygote, why: str) -> None:
        """The zygote is gone or useless: kill it, and fork what waited on it directly."""
        if self._by_key.get(zygote.key) is zygote:
            del self._by_key[zygote.key]
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(zygote.sock)
            zygote.sock.close()
            osutil.signal_group(zygote.pid, signal.SIGKILL)
            print(f"forkserver: zygote pid {zygote.pid} of {zygote.model} is gone: {why}", file=sys.stderr, flush=True)
        queue, zygote.queue = zygote.queue, []
        for spawn in queue:
            self._fall_back(spawn, f"the zygote is gone ({why})")

    def reaped(self, pid: int, status: int) -> bool:
        """A child the instance table does not know exited: True if it was a zygote."""
        zygote = self._by_pid.pop(pid, None)
        if zygote is None:
            return False
        zygote.exit_code = osutil.exit_code_from_status(status)
        if self._by_key.get(zygote.key) is zygote:
            self.readable(zygote.sock)  # what it said before it died (a pid, most likely)
            self._lost(zygote, f"it exited ({zygote.exit_code})")
        osutil.signal_group(zygote.pid, signal.SIGKILL)  # an intermediate left behind, if any
        shutil.rmtree(zygote.tmpdir, ignore_errors=True)
        return True

    def instance_finished(self, instance_id: str) -> None:
        for zygote in self._by_key.values():
            if instance_id in zygote.instances:
                zygote.instances.discard(instance_id)
                if not zygote.instances and not zygote.queue:
                    zygote.idle_since = time.monotonic()

    def _deadlines(self, zygote: Zygote) -> list[tuple[float, str]]:
        found = []
        if zygote.idle_since is not None:
            found.append((zygote.idle_since + self.linger, ""))  # idle: retired
        if not zygote.ready:
            found.append((zygote.started_at + LOAD_TIMEOUT, f"its load took longer than {LOAD_TIMEOUT:g}s"))
        sent = [spawn.sent_at for spawn in zygote.queue if spawn.sent_at is not None]
        if sent:
            found.append((min(sent) + FORK_TIMEOUT, f"it forked nothing within {FORK_TIMEOUT:g}s of being asked"))
        return found

    def timeout(self) -> float | None:
        deadlines = [when for zygote in self._by_key.values() for when, _ in self._deadlines(zygote)]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def tick(self) -> None:
        """Stop zygotes idle for ``linger`` seconds (no instance forked from them left), and give up
        on one that does not answer in time (a hung load or fork): what waits on it forks directly."""
        now = time.monotonic()
        for zygote in list(self._by_key.values()):
            for when, why in self._deadlines(zygote):
                if now >= when:
                    if why:
                        self._lost(zygote, why)
                    else:
                        self._retire(zygote)
                    break

    def _retire(self, zygote: Zygote) -> None:
        del self._by_key[zygote.key]
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(zygote.sock)
        zygote.sock.close()  # it exits when its socket closes; SIGKILL in case it is busy
        osutil.signal_group(zygote.pid, signal.SIGKILL)

    def shutdown(self) -> None:
        """Kill every zygote; what waited on one falls back (the server refuses it if stopping)."""
        for zygote in list(self._by_key.values()):
            self._lost(zygote, "the forkserver is shutting down")

    def live_pids(self) -> list[int]:
        """Zygotes not reaped yet (including retired ones)."""
        return list(self._by_pid)


# ---------------------------------------------------------------------- the zygote process


def zygote_main(
    sock: socket.socket,
    workload: Workload,
    parsed: ParsedOptions,
    env: Mapping[str, str],
    tmpdir: str,
    forkserver_pid: int,
    base_env: Mapping[str, str],
) -> None:
    """Load the model once, then fork instances on request, until the socket closes. Never returns."""
    code = EXIT_ZYGOTE_FAILED
    try:
        os.setsid()
        osutil.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != forkserver_pid:
            os._exit(code)
        osutil.set_process_title(f"zygote {parsed.model}", comm="vllm-zygote")
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        atexit._clear()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        keep = {0, 1, 2, sock.fileno()}
        for fd in osutil.open_fds():
            if fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
        os.environ.clear()
        os.environ.update(env)
        os.environ["TMPDIR"] = tmpdir
        tempfile.tempdir = None
        began = time.time()
        try:
            workload.load_shared(parsed, tmpdir)  # type: ignore[attr-defined]
        except BaseException as exc:  # noqa: BLE001 - told to the forkserver, which falls back
            traceback.print_exc()
            _send(sock, {"event": "failed", "error": f"{type(exc).__name__}: {exc}"})
            os._exit(code)
        done = time.time()
        gc.collect()
        gc.freeze()  # the model's objects are never collected, so never written by a collection
        _send(sock, {"event": "ready", "load_start": began, "load_done": done, "seconds": done - began})
        _serve(sock, workload, forkserver_pid, dict(base_env))
        code = 0
    except BaseException:  # noqa: BLE001 - a zygote must never return into the server loop
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        os._exit(code)


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.send(json.dumps(message).encode())


def _serve(sock: socket.socket, workload: Workload, forkserver_pid: int, base_env: dict[str, str]) -> None:
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_PACKET, 4)
        except InterruptedError:
            continue
        if not data:
            return  # the forkserver closed its end: we are no longer wanted
        log_fd = fds[0] if fds else -1
        for extra in fds[1:]:
            os.close(extra)
        go_w = -1
        try:
            request = json.loads(data)
            pid, go_w = _fork_instance(request, log_fd, workload, forkserver_pid, sock, base_env)
            _send(sock, {"event": "forked", "instance_id": request["instance_id"], "pid": pid})
        except Exception as exc:  # noqa: BLE001 - one bad request: the forkserver falls back
            _send(sock, {"event": "forked", "instance_id": _instance_id(data), "pid": None, "error": str(exc)})
        finally:
            if log_fd >= 0:
                os.close(log_fd)
            if go_w >= 0:
                with contextlib.suppress(OSError):
                    os.write(go_w, b"g")  # the forkserver knows its pid now: it may start
                os.close(go_w)


def _instance_id(data: bytes) -> str | None:
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(data).get("instance_id"))
    return None


def _fork_instance(
    request: dict[str, Any],
    log_fd: int,
    workload: Workload,
    forkserver_pid: int,
    sock: socket.socket,
    base_env: dict[str, str],
) -> tuple[int, int]:
    """Fork the instance through an intermediate; return its pid and the write end of its "go" pipe."""
    if log_fd < 0:
        raise ValueError("no log file descriptor came with the request")
    parsed = dataclasses.replace(
        workload.parse(list(request["argv"])),
        parsed_at=request.get("parsed_at"),
        waited_for_weights=tuple(request["waited"]) if request.get("waited") else None,
    )
    pid_r, pid_w = os.pipe()
    go_r, go_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    intermediate = os.fork()
    if intermediate == 0:
        try:
            child = os.fork()
            if child == 0:
                os.close(pid_r)
                os.close(pid_w)
                os.close(go_w)
                sock.close()
                env = {**base_env, **request.get("env", {})}  # as a direct fork: the forkserver's + its own
                _become_instance(request, parsed, env, log_fd, go_r, workload, forkserver_pid)
            os.write(pid_w, str(child).encode())
        finally:
            os._exit(0)
    os.close(pid_w)
    os.close(go_r)
    try:
        with os.fdopen(pid_r, "rb") as pipe:
            written = pipe.read()
        os.waitpid(intermediate, 0)
    except BaseException:
        os.close(go_w)
        raise
    if not written:
        os.close(go_w)
        raise RuntimeError("the intermediate process died before it forked the instance")
    return int(written), go_w


def _become_instance(
    request: dict[str, Any],
    parsed: ParsedOptions,
    env: dict[str, str],
    log_fd: int,
    go_r: int,
    workload: Workload,
    forkserver_pid: int,
) -> None:
    from forkserver.child import EXIT_SETUP_FAILED, become_instance

    try:
        # Named as what it is at once: never taken for the zygote (ps, psutil) while it waits for "go".
        osutil.set_process_title(f"instance {request['instance_id']}", comm="vllm-instance")
        deadline = time.monotonic() + REPARENT_TIMEOUT
        while os.getppid() != forkserver_pid:  # the intermediate exits at once; then we are the forkserver's
            if time.monotonic() > deadline:
                os._exit(EXIT_SETUP_FAILED)
            time.sleep(0.0005)
        if os.read(go_r, 1) != b"g":
            os._exit(EXIT_SETUP_FAILED)  # the zygote died before the forkserver knew us: never run unknown
        os.close(go_r)
        after_fork = getattr(workload, "after_zygote_fork", None)
        if after_fork is not None:
            after_fork()
    except BaseException:  # noqa: BLE001
        os._exit(EXIT_SETUP_FAILED)
    become_instance(
        instance_id=str(request["instance_id"]),
        workload=workload,
        parsed=parsed,
        log_fd=log_fd,
        env=env,
        tmpdir=str(request["tmpdir"]),
        forkserver_pid=forkserver_pid,
        nice=int(request.get("nice") or 0),
    )
