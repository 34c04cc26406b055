"""The forkserver loop: accept API clients on a Unix socket, fork instances, reap them.

Single-threaded by design: ``os.fork`` copies only the calling thread, so the server never
starts one. Signals only write to the wakeup socket; the loop does the work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from forkserver import fork_safety, leftovers, osutil, protocol, zygotes
from forkserver.child import become_instance
from forkserver.instances import SWEEP_INTERVAL, Instance, InstanceTable
from forkserver.workload import OptionsError, ParsedOptions, Workload

MAX_CLIENTS = 64
MAX_NICE = 19  # the lowest CPU priority an instance may be asked to run at
MAX_GRACE = 3600.0  # seconds from SIGTERM to SIGKILL, at most (NaN and infinity are refused)
MAX_OUTGOING = 8 << 20  # a client whose unread replies pass this is dropped, never waited for
FLUSH_SECONDS = 1.0  # the most a last flush to one client may take (a frame error, shutdown)
HELLO_BUDGET = protocol.MAX_FRAME - (64 << 10)  # a hello page's instances stay under this, encoded
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _last_value(argv: list[str], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` or ``flag=VALUE`` in ``argv`` (argparse's rule: last wins)."""
    found = None
    for index, token in enumerate(argv):
        if token == flag and index + 1 < len(argv):
            found = argv[index + 1]
        elif token.startswith(flag + "="):
            found = token[len(flag) + 1 :]
    return found


def _port_of(argv: list[str]) -> int:
    value = _last_value(argv, "--port") or ""
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 5 else 0


class RequestError(Exception):
    """A request that gets an ``ok: false`` reply of the given kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class _Client:
    sock: socket.socket
    frames: protocol.FrameBuffer = field(default_factory=protocol.FrameBuffer)
    outgoing: bytearray = field(default_factory=bytearray)


class ForkServer:
    """Owns the listening socket, the clients and the instances."""

    def __init__(
        self,
        *,
        listener: socket.socket,
        workload: Workload,
        base_env: Mapping[str, str],
        tmp_root: str,
        preload_seconds: float,
        ledger: leftovers.Ledger | None = None,
        zygote_linger: float = 0.0,
    ) -> None:
        self._listener = listener
        self._workload = workload
        self._base_env = dict(base_env)
        self._tmp_root = tmp_root
        self._preload_seconds = preload_seconds
        # Whether instances may use vLLM's sleep mode here (vLLM on CPU has none): the front door asks.
        self._sleep_mode = bool(getattr(workload, "sleep_mode_available", lambda: False)())
        self._selector = selectors.DefaultSelector()
        self._clients: dict[int, _Client] = {}
        self._zygotes = zygotes.ZygotePool(
            workload=workload,
            base_env=self._base_env,
            tmp_root=tmp_root,
            selector=self._selector,
            forked=self._forked_by_zygote,
            fall_back=self._spawn_directly,
            linger=zygote_linger,
        )
        self._instances = InstanceTable(on_finished=self._report_exit, ledger=ledger, on_other_exit=self._zygotes.reaped)
        self._replying_to: tuple[_Client, Any] | None = None  # while a request is dispatched
        self._shutdown_grace: float | None = None
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._threads_seen = fork_safety.extra_threads()  # reported at start-up by __main__

    # ----------------------------------------------------------------- main loop

    def serve_forever(self) -> None:
        """Run until shut down (SIGTERM, SIGINT or a ``shutdown`` request) and every instance is gone."""
        for sock in (self._wakeup_r, self._wakeup_w, self._listener):
            sock.setblocking(False)
        self._pending_signals: list[int] = []  # before the handlers that append to it
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._note_signal)
        self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._wakeup_r, selectors.EVENT_READ, "wakeup")
        while True:
            for key, mask in self._selector.select(self._timeout()):
                if key.data == "listener":
                    self._accept()
                elif key.data == "wakeup":
                    self._drain_wakeup()
                elif key.data == "zygote":
                    self._zygotes.readable(key.fileobj)  # type: ignore[arg-type]
                else:
                    self._service_client(key.fd, mask)
            self._handle_signals()
            self._instances.tick()
            self._zygotes.tick()
            if self._shutdown_grace is not None and not self._instances.live() and not self._zygotes.live_pids():
                self._flush_clients()
                return

    def _timeout(self) -> float | None:
        timeouts = [t for t in (self._instances.timeout(), self._zygotes.timeout()) if t is not None]
        if self._zygotes.live_pids() and self._shutdown_grace is not None:
            timeouts.append(SWEEP_INTERVAL)
        return min(timeouts) if timeouts else None

    def _note_signal(self, signum: int, frame: object) -> None:
        self._pending_signals.append(signum)  # only record: the loop acts

    def _handle_signals(self) -> None:
        while self._pending_signals:
            signum = self._pending_signals.pop()
            if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self._begin_shutdown(grace=10.0)

    def _drain_wakeup(self) -> None:
        try:
            while self._wakeup_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    # ----------------------------------------------------------------- clients

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid != os.getuid() or len(self._clients) >= MAX_CLIENTS:
            sock.close()  # only the same user may drive the forkserver
            return
        sock.setblocking(False)
        self._clients[sock.fileno()] = _Client(sock)
        self._selector.register(sock, selectors.EVENT_READ, "client")

    def _drop_client(self, fd: int) -> None:
        client = self._clients.pop(fd, None)
        if client is None:
            return
        self._selector.unregister(client.sock)
        client.sock.close()
        # Its creates still waiting for a zygote failed for it (the API answered 503): not forked later,
        # unseen by the API that connects next (it has had its hello by then).
        for spawn in self._zygotes.take_back(lambda spawn: spawn.reply_to is not None and spawn.reply_to[0] is client):
            print(f"forkserver: {spawn.instance_id} not forked: its client is gone", file=sys.stderr, flush=True)
            self._discard(spawn)

    def _service_client(self, fd: int, mask: int) -> None:
        client = self._clients.get(fd)
        if client is None:
            return
        if mask & selectors.EVENT_WRITE:
            self._write_pending(client)
        if mask & selectors.EVENT_READ:
            try:
                chunk = client.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._drop_client(fd)  # a client that goes away never stops the server
                return
            try:
                messages = client.frames.feed(chunk)
            except protocol.FrameError as exc:
                self._send(client, {"ok": False, "kind": protocol.KIND_INVALID, "error": str(exc)})
                self._flush_client(client)  # this client only: the others are not waited for
                self._drop_client(fd)
                return
            for message in messages:
                self._replying_to = (client, message.get("id"))
                try:
                    reply = self._dispatch(message)
                finally:
                    self._replying_to = None
                if reply is not None:  # None: answered later (a spawn waiting on a zygote)
                    self._send(client, reply)

    def _send(self, client: _Client, message: dict[str, Any]) -> None:
        try:
            frame = protocol.encode(message)
        except (protocol.FrameError, TypeError, ValueError) as exc:  # one reply can never end the server
            frame = protocol.encode(
                {
                    "ok": False,
                    "kind": protocol.KIND_INTERNAL,
                    "error": f"reply not sent: {exc}",
                    "id": message.get("id"),
                }
            )
        client.outgoing += frame
        if len(client.outgoing) > MAX_OUTGOING:
            print("forkserver: dropping a client that does not read its replies", file=sys.stderr, flush=True)
            self._drop_client(client.sock.fileno())
            return
        self._write_pending(client)

    def _write_pending(self, client: _Client) -> None:
        fd = client.sock.fileno()
        try:
            while client.outgoing:
                sent = client.sock.send(client.outgoing)
                del client.outgoing[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop_client(fd)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.outgoing else 0)
        if fd in self._clients:
            self._selector.modify(client.sock, events, "client")

    def _flush_clients(self) -> None:
        for client in list(self._clients.values()):
            self._flush_client(client)

    def _flush_client(self, client: _Client) -> None:
        """Send what is queued for ``client``, waiting at most FLUSH_SECONDS (a last word before a close)."""
        if self._clients.get(client.sock.fileno()) is not client:
            return  # dropped already (its socket is closed)
        try:
            client.sock.settimeout(FLUSH_SECONDS)
            client.sock.sendall(client.outgoing)
        except OSError:
            pass
        finally:
            client.outgoing.clear()
            with contextlib.suppress(OSError):
                client.sock.setblocking(False)

    def _broadcast(self, message: dict[str, Any]) -> None:
        for client in list(self._clients.values()):
            self._send(client, message)

    # ----------------------------------------------------------------- requests

    def _dispatch(self, message: dict[str, Any]) -> dict[str, Any] | None:
        request_id = message.get("id")
        handlers = {
            protocol.OP_HELLO: self._op_hello,
            protocol.OP_VALIDATE: self._op_validate,
            protocol.OP_SPAWN: self._op_spawn,
            protocol.OP_STOP: self._op_stop,
            protocol.OP_CANCEL: self._op_cancel,
            protocol.OP_FORGET: self._op_forget,
            protocol.OP_NOTE: self._op_note,
            protocol.OP_SHUTDOWN: self._op_shutdown,
        }
        try:
            handler = handlers.get(message.get("op"))  # type: ignore[arg-type]
            if handler is None:
                raise RequestError(protocol.KIND_INVALID, f"unknown operation {message.get('op')!r}")
            answer = handler(message)
            if answer is None:
                return None
            reply = {"ok": True, **answer}
        except RequestError as exc:
            reply = {"ok": False, "kind": exc.kind, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the server
            reply = {"ok": False, "kind": protocol.KIND_INTERNAL, "error": f"{type(exc).__name__}: {exc}"}
        reply["id"] = request_id
        return reply

    def _op_hello(self, message: dict[str, Any]) -> dict[str, Any]:
        """The forkserver and its instances, a page at a time: from ``offset``, under one frame.

        ``next_offset`` is set when more instances follow (their metadata can be large).
        """
        offset = message.get("offset", 0)
        if type(offset) is not int or offset < 0:
            raise RequestError(protocol.KIND_INVALID, "offset must be an integer >= 0")
        instances = self._instances.all()
        page: list[dict[str, Any]] = []
        size = 0
        for instance in instances[offset:]:
            described = instance.describe()
            length = len(json.dumps(described, separators=(",", ":")))
            if page and size + length > HELLO_BUDGET:
                break
            if length > HELLO_BUDGET:  # alone too big for a frame: sent without its metadata
                described = {**described, "meta": {}, "meta_dropped": True}
            page.append(described)
            size += length
        reply: dict[str, Any] = {
            "version": protocol.PROTOCOL_VERSION,
            "pid": os.getpid(),
            "workload": self._workload.name,
            "workload_version": getattr(sys.modules.get(self._workload.name), "__version__", None),
            "preload_seconds": self._preload_seconds,
            "sleep_mode": self._sleep_mode,
            "threads": osutil.os_thread_count(),
            "instances": page,
        }
        if offset + len(page) < len(instances):
            reply["next_offset"] = offset + len(page)
        return reply

    def _parse(self, message: dict[str, Any]) -> ParsedOptions:
        argv = message.get("argv")
        if not isinstance(argv, list) or not all(isinstance(token, str) for token in argv):
            raise RequestError(protocol.KIND_INVALID, "argv must be a list of strings")
        try:
            return self._workload.parse(argv)
        except OptionsError as exc:
            raise RequestError(protocol.KIND_INVALID, str(exc)) from None

    def _parse_or_unstartable(self, message: dict[str, Any]) -> ParsedOptions:
        """The options parsed; for an ``unstartable`` spawn (the launcher knows the options cannot
        start: llm-d FMA's flow, where a stopped instance is the answer, not a refused create) an
        instance that prints that reason and exits 2."""
        reason = message.get("unstartable")
        if reason is None:
            return self._parse(message)
        argv = message.get("argv")
        if not isinstance(reason, str) or not isinstance(argv, list) or not all(isinstance(t, str) for t in argv):
            raise RequestError(protocol.KIND_INVALID, "unstartable must be a string and argv a list of strings")
        return ParsedOptions(
            argv=argv, model=_last_value(argv, "--model") or "", port=_port_of(argv), port_given=True, error=reason
        )

    def _op_validate(self, message: dict[str, Any]) -> dict[str, Any]:
        parsed = self._parse(message)
        return {"model": parsed.model, "port": parsed.port, "port_given": parsed.port_given, "host": parsed.host}

    def _op_spawn(self, message: dict[str, Any]) -> dict[str, Any] | None:
        if self._shutdown_grace is not None:
            raise RequestError(protocol.KIND_CONFLICT, "the forkserver is shutting down")
        instance_id = message.get("instance_id")
        if not isinstance(instance_id, str) or not protocol.valid_instance_id(instance_id):
            raise RequestError(protocol.KIND_INVALID, f"invalid instance id {instance_id!r}")
        if self._instances.get(instance_id) is not None or instance_id in self._zygotes.pending_ids():
            raise RequestError(protocol.KIND_CONFLICT, f"instance {instance_id!r} already exists")
        env = message.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise RequestError(protocol.KIND_INVALID, "env must map strings to strings")
        meta = message.get("meta") or {}
        if not isinstance(meta, dict):
            raise RequestError(protocol.KIND_INVALID, "meta must be an object")
        log_path = message.get("log_path")
        if not isinstance(log_path, str) or not os.path.isabs(log_path):
            raise RequestError(protocol.KIND_INVALID, "log_path must be an absolute path")
        nice = message.get("nice", 0)
        if type(nice) is not int or not 0 <= nice <= MAX_NICE:
            raise RequestError(protocol.KIND_INVALID, f"nice must be an integer from 0 to {MAX_NICE}")
        parsed = dataclasses.replace(self._parse_or_unstartable(message), parsed_at=time.time())
        try:
            tmpdir = tempfile.mkdtemp(prefix="i", dir=self._tmp_root)
        except OSError as exc:
            raise RequestError(protocol.KIND_INTERNAL, f"cannot make the instance's temp dir: {exc}") from None
        try:
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise RequestError(protocol.KIND_INTERNAL, f"cannot open log file: {exc}") from None
        spawn = zygotes.PendingSpawn(
            instance_id=instance_id,
            parsed=parsed,
            env=env,
            log_fd=log_fd,
            log_path=log_path,
            tmpdir=tmpdir,
            nice=nice,
            meta=meta,
            shm_before=frozenset(leftovers.listing().items()),  # never the instance's: it was there first
            reply_to=self._replying_to,
        )
        key = None if parsed.error is not None else self._zygotes.key_for(parsed, env)  # an unstartable one loads nothing
        if key is not None:
            self._zygotes.submit(key, spawn)  # answered once the model's zygote has forked it
            return None
        return self._fork(spawn).describe()

    def _fork(self, spawn: zygotes.PendingSpawn) -> Instance:
        """Fork the instance from this process (its weights loaded by itself); closes its log fd."""
        child_env = {**self._base_env, **spawn.env}
        self._report_new_threads()
        sys.stdout.flush()
        sys.stderr.flush()
        my_pid = os.getpid()
        # Stop signals stay pending in the child until it has reset its handlers (child.py).
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.close(spawn.log_fd)
            shutil.rmtree(spawn.tmpdir, ignore_errors=True)
            raise RequestError(protocol.KIND_INTERNAL, f"fork failed: {exc}") from None
        if pid == 0:
            become_instance(
                instance_id=spawn.instance_id,
                workload=self._workload,
                parsed=spawn.parsed,
                log_fd=spawn.log_fd,
                env=child_env,
                tmpdir=spawn.tmpdir,
                forkserver_pid=my_pid,
                nice=spawn.nice,
            )
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(spawn.log_fd)
        instance = self._instance_for(spawn, pid)
        self._instances.add(instance)
        return instance

    def _instance_for(self, spawn: zygotes.PendingSpawn, pid: int) -> Instance:
        return Instance(
            instance_id=spawn.instance_id,
            pid=pid,
            model=spawn.parsed.model,
            port=spawn.parsed.port,
            log_path=spawn.log_path,
            tmpdir=spawn.tmpdir,
            forked_at=time.time(),
            meta=spawn.meta,
            shm_before=spawn.shm_before,
        )

    def _forked_by_zygote(self, spawn: zygotes.PendingSpawn, pid: int, zygote: zygotes.Zygote) -> None:
        """A zygote forked ``spawn``'s instance (now our child): track it, answer the spawn."""
        instance = self._instance_for(spawn, pid)
        instance.zygote_pid = zygote.pid
        self._instances.add(instance, may_be_reaped=True)
        self._answer_forked(spawn, instance)

    def _answer_forked(self, spawn: zygotes.PendingSpawn, instance: Instance) -> None:
        """Answer a spawn with its instance; if its client went away meanwhile (its fork was already
        asked), tell whoever is connected, who adopts it as it would from a hello."""
        if self._requester(spawn) is None:
            self._broadcast({"event": protocol.EVENT_FORKED, **instance.describe()})
        else:
            self._answer(spawn, {"ok": True, **instance.describe()})

    def _requester(self, spawn: zygotes.PendingSpawn) -> _Client | None:
        """The connected client a spawn answers to; None if it is gone."""
        client = spawn.reply_to[0] if spawn.reply_to is not None else None
        return client if isinstance(client, _Client) and self._clients.get(client.sock.fileno()) is client else None

    def _spawn_directly(self, spawn: zygotes.PendingSpawn, why: str) -> None:
        """A spawn its zygote could not fork: fork it here (it loads its own weights), or refuse it."""
        if self._shutdown_grace is not None:
            self._discard(spawn)
            self._answer(spawn, {"ok": False, "kind": protocol.KIND_CONFLICT, "error": "the forkserver is shutting down"})
            return
        print(f"forkserver: {spawn.instance_id} forked directly: {why}", file=sys.stderr, flush=True)
        try:
            instance = self._fork(spawn)
        except RequestError as exc:
            self._answer(spawn, {"ok": False, "kind": exc.kind, "error": str(exc)})
            return
        self._answer_forked(spawn, instance)

    def _answer(self, spawn: zygotes.PendingSpawn, reply: dict[str, Any]) -> None:
        client = self._requester(spawn)
        if client is not None and spawn.reply_to is not None:
            self._send(client, {**reply, "id": spawn.reply_to[1]})

    def _report_new_threads(self) -> None:
        """Name OS threads that appeared since start-up: the child inherits none of them."""
        extra = fork_safety.extra_threads()
        if extra != self._threads_seen:
            self._threads_seen = extra
            print(
                f"forkserver: warning: extra OS threads at fork time: {', '.join(extra) or 'none'}",
                file=sys.stderr,
                flush=True,
            )

    def _op_stop(self, message: dict[str, Any]) -> dict[str, Any]:
        instance = self._lookup(message)
        grace = message.get("grace_seconds", 10.0)
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace <= MAX_GRACE:
            raise RequestError(protocol.KIND_INVALID, f"grace_seconds must be a number from 0 to {MAX_GRACE:g}")
        self._instances.stop(instance, float(grace))
        return {"running": not instance.finished}

    def _op_cancel(self, message: dict[str, Any]) -> dict[str, Any]:
        """Drop a spawn still waiting for its model's zygote (a delete of an instance being created):
        its spawn is answered with a conflict, and nothing of it is left (temp dir, log file)."""
        instance_id = message.get("instance_id")
        asker = self._replying_to[0] if self._replying_to is not None else None  # only its own spawns
        taken = self._zygotes.take_back(
            lambda spawn: spawn.instance_id == instance_id and spawn.reply_to is not None and spawn.reply_to[0] is asker
        )
        for spawn in taken:
            self._discard(spawn)
            self._answer(spawn, {"ok": False, "kind": protocol.KIND_CONFLICT,
                                 "error": f"instance {spawn.instance_id!r} was deleted before it was forked"})  # fmt: skip
        return {"cancelled": bool(taken)}

    @staticmethod
    def _discard(spawn: zygotes.PendingSpawn) -> None:
        """Leave nothing of a spawn that will not be forked: its log fd and file, its temp dir."""
        os.close(spawn.log_fd)
        with contextlib.suppress(OSError):
            os.unlink(spawn.log_path)
        shutil.rmtree(spawn.tmpdir, ignore_errors=True)

    def _op_forget(self, message: dict[str, Any]) -> dict[str, Any]:
        instance = self._lookup(message)
        if not instance.finished:
            raise RequestError(protocol.KIND_CONFLICT, f"instance {instance.instance_id!r} is still running")
        self._instances.forget(instance)
        return {}

    def _op_note(self, message: dict[str, Any]) -> dict[str, Any]:
        instance = self._lookup(message)
        note = message.get("meta")
        if not isinstance(note, dict):
            raise RequestError(protocol.KIND_INVALID, "meta must be an object")
        instance.meta.update(note)
        return {}

    def _op_shutdown(self, message: dict[str, Any]) -> dict[str, Any]:
        grace = message.get("grace_seconds", 10.0)
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace <= MAX_GRACE:
            raise RequestError(protocol.KIND_INVALID, f"grace_seconds must be a number from 0 to {MAX_GRACE:g}")
        self._begin_shutdown(float(grace))
        return {}

    def _lookup(self, message: dict[str, Any]) -> Instance:
        instance = self._instances.get(message.get("instance_id"))
        if instance is None:
            raise RequestError(protocol.KIND_NOT_FOUND, f"no instance {message.get('instance_id')!r}")
        return instance

    # ----------------------------------------------------------------- stopping

    def _begin_shutdown(self, grace: float) -> None:
        if self._shutdown_grace is None:
            self._shutdown_grace = grace
            try:
                self._selector.unregister(self._listener)
            except (KeyError, ValueError):
                pass
        for instance in self._instances.live():
            self._instances.stop(instance, grace)
        self._zygotes.shutdown()  # spawns still waiting on one are refused

    def _report_exit(self, instance: Instance) -> None:
        self._zygotes.instance_finished(instance.instance_id)
        self._broadcast({"event": protocol.EVENT_EXITED, **instance.describe()})


def make_private_dir(directory: str) -> None:
    """Create ``directory`` (and parents) as 0700 if it does not exist; an existing one is left as
    it is (``--socket /tmp/x.sock`` must not chmod /tmp: the socket's own 0600 and the uid check
    guard it)."""
    if os.path.isdir(directory):
        return
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)  # makedirs' mode passes through the umask


def bind_listener(path: str) -> socket.socket:
    """A Unix stream socket at ``path`` (socket 0600; its directory made 0700 if it is new)."""
    make_private_dir(os.path.dirname(path))
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    listener.listen(16)
    return listener
