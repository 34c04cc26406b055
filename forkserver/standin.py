"""A stand-in for vLLM: a tiny HTTP server with switchable misbehaviour.

Used by the fast lifecycle tests and the API-overhead benchmark, never instead of the real
vLLM tests. It takes ``--model`` and ``--port`` like vLLM, answers ``GET /health`` and
``GET /v1/models``, answers ``POST /v1/...`` with a small JSON echo (or, with ``"stream": true``,
``"chunks"`` server-sent events ``"interval"`` seconds apart), and can be told to crash (at start
or later), ignore SIGTERM, start a helper process (as vLLM starts its EngineCore), flood stdout
and stderr, or print environment variables.

With ``--fast`` it is an asyncio server that can also misbehave on purpose, as an HTTP peer of
the front door's proxy: a request whose body has ``"script"`` is answered with exactly the bytes
the script says (``{"send": text}``, latin-1, ``{"sleep": seconds}``, ``{"close": true}``), so a
test can send truncated answers, 1xx, trailers, stalls and odd chunking; ``GET /requests``
answers how many POSTs it has read (each one whole), and idle connections are closed after
``--keep-alive-timeout`` seconds as uvicorn does.

With ``VLLM_SERVER_DEV_MODE=1`` it serves vLLM's sleep endpoints as vLLM 0.32's dev-mode
router does (``vllm/entrypoints/serve/dev/sleep/api_router.py``, attached on dev mode alone, with
or without ``--enable-sleep-mode``): ``POST /sleep?level=0|1|2`` (default 1; another level is a
422) answers ``{"status": "sleeping", "level": N}``, ``POST /wake_up[?tags=T...]`` answers
``{"status": "awake"|"sleeping", "tags": [...]|null}`` (``weights`` and ``kv_cache`` sleep at level
1 and 2 and wake together or by tag; ``scheduling`` resumes a level-0 pause), ``GET /is_sleeping``
answers ``{"is_sleeping": bool}``; and ``POST /collective_rpc`` (``reload_weights``) and ``POST
/reset_prefix_cache``. Without ``--enable-sleep-mode`` the state changes all the same and nothing
is freed, as vLLM on CPU does (llm-d FMA's controller sleeps and wakes such instances). Asleep it
refuses requests; woken from level 2 without ``reload_weights`` it answers ``"garbage": true``
(its weights are gone). ``--wake-delay`` and ``--fail-wake`` make waking slow or fail.
``STANDIN_NO_SLEEP_MODE=1`` in the forkserver's environment makes its platform one without
sleep mode (as vLLM on CPU). ``STANDIN_PRELOAD_FAILS=MESSAGE`` makes its preload fail with
MESSAGE, as vLLM's fails where it cannot start (a missing library, no C++ compiler).

With ``--share-weights-mib N`` its instances share "weights" (N MiB) through a zygote, as vLLM's
do (forkserver/zygotes.py): the zygote allocates them (after ``--zygote-load-delay`` seconds, or
fails with ``--zygote-fail``), and an instance prints ``WEIGHTS FROM <zygote pid>``, or
``WEIGHTS OWN`` if it had to make its own.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import mmap
import os
import signal
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

from forkserver.workload import OptionsError, ParsedOptions, WorkloadOptions, argparse_error, tokens_name_flag


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="standin", add_help=False)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default=None)
    parser.add_argument("--startup-delay", type=float, default=0.0, help="seconds before serving")
    parser.add_argument("--crash-after", type=float, default=None, help="exit after this many seconds")
    parser.add_argument("--exit-code", type=int, default=3)
    parser.add_argument("--fail-at-start", action="store_true", help="exit with --exit-code before serving")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--spawn-helper", action="store_true", help="fork a long-lived helper")
    parser.add_argument("--spam-lines", type=int, default=0, help="lines on stdout and stderr each")
    parser.add_argument("--print-env", action="append", default=[], help="print VAR=value at start")
    parser.add_argument("--map-file", default=None, help="map this file while it runs (a model copied to RAM)")
    parser.add_argument("--make-segment", default=None, help="create and map this /dev/shm segment, and leave it")
    parser.add_argument("--served-model-name", nargs="+", default=None, help="names POST requests may use")
    parser.add_argument("--fast", action="store_true", help="an asyncio server answering as fast as it can")
    parser.add_argument("--keep-alive-timeout", type=float, default=None,
                        help="--fast: seconds an idle connection is kept (default: $VLLM_HTTP_TIMEOUT_KEEP_ALIVE "
                        "or 5, as vLLM's)")  # fmt: skip
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="as vLLM's (the launcher reads it)")
    parser.add_argument("--enable-sleep-mode", action="store_true", help="as vLLM's: the sleep endpoints")
    parser.add_argument("--wake-delay", type=float, default=0.0, help="seconds POST /wake_up takes")
    parser.add_argument("--fail-wake", action="store_true", help="POST /wake_up answers 500")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="as vLLM's (for GPU placement)")
    parser.add_argument("--share-weights-mib", type=int, default=0, help="weights shared through a zygote")
    parser.add_argument("--zygote-load-delay", type=float, default=0.0, help="seconds the zygote's load takes")
    parser.add_argument("--zygote-fail", action="store_true", help="the zygote's load fails")
    return parser


_SHARED: tuple[int, bytearray] | None = None  # (the zygote's pid, its "weights"), inherited by its forks


class _Sleep:
    """The stand-in's sleep state, as vLLM's engine keeps it (a paused scheduler, sleeping tags)."""

    enabled = False  # --enable-sleep-mode (vLLM's routes need only dev mode; see the module's docstring)
    wake_delay = 0.0
    fail_wake = False
    paused = False  # the scheduler is paused (every level pauses it)
    tags: ClassVar[set[str]] = set()  # what sleeps: vLLM's SLEEP_TAGS at level 1 and 2
    level = 0  # the level it fell asleep at (1 or 2) while tags sleep
    weights_lost = False  # woken from level 2, weights not reloaded yet

    SLEEP_TAGS = frozenset(("weights", "kv_cache"))

    @classmethod
    def asleep(cls) -> bool:
        """vLLM's ``is_sleeping``: the scheduler paused or the executor sleeping."""
        return cls.paused or bool(cls.tags)

    @classmethod
    def sleep(cls, level: int) -> None:
        cls.paused = True
        if level >= 1 and "weights" not in cls.tags:  # already asleep: vLLM warns and changes nothing
            cls.tags, cls.level = set(cls.SLEEP_TAGS), level

    @classmethod
    def wake(cls, tags: list[str] | None) -> bool:
        """vLLM's ``EngineCore.wake_up``: True if fully awake (then the scheduler resumes)."""
        executor_tags = None if tags is None else [tag for tag in tags if tag != "scheduling"]
        if cls.tags and (executor_tags is None or executor_tags):
            if executor_tags is None:
                woken = set(cls.tags)
            elif all(tag in cls.tags for tag in executor_tags):
                woken = set(executor_tags)
            else:
                woken = set()  # a tag that is not asleep: vLLM warns and wakes nothing
            if "weights" in woken and cls.level == 2:
                cls.weights_lost = True
            cls.tags -= woken
        if not cls.tags:
            cls.paused, cls.level = False, 0
        return not cls.asleep()


def _validation_error(name: str, value: str, message: str, kind: str) -> bytes:
    """FastAPI's 422 body for a bad query parameter."""
    return json.dumps({"detail": [{"type": kind, "loc": ["query", name], "msg": message, "input": value}]}).encode()


class _Health(BaseHTTPRequestHandler):
    model = ""
    served: list[str] = []
    protocol_version = "HTTP/1.1"

    def _sleep_endpoint(self, method: str) -> bool:
        """Serve vLLM's sleep endpoints (dev mode only: ``VLLM_SERVER_DEV_MODE=1``, as vLLM attaches them)."""
        path, _, query = self.path.partition("?")
        endpoints = {("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping"), ("POST", "/collective_rpc"),
                     ("POST", "/reset_prefix_cache")}  # fmt: skip
        if (method, path) not in endpoints:
            return False
        if os.environ.get("VLLM_SERVER_DEV_MODE") != "1":
            self._answer(404, b'{"detail": "Not Found"}')
            return True
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        if path == "/is_sleeping":
            self._answer(200, json.dumps({"is_sleeping": _Sleep.asleep()}, separators=(",", ":")).encode())
        elif path == "/sleep":
            text = params.get("level", ["1"])[-1]
            try:
                level = int(text)
            except ValueError:
                message = "Input should be a valid integer, unable to parse string as an integer"
                self._answer(422, _validation_error("level", text, message, "int_parsing"))
                return True
            if not 0 <= level <= 2:
                kind, bound = ("greater_than_equal", "greater than or equal to 0") if level < 0 else (
                    "less_than_equal", "less than or equal to 2")  # fmt: skip
                self._answer(422, _validation_error("level", text, f"Input should be {bound}", kind))
                return True
            _Sleep.sleep(level)
            print(f"standin asleep at level {level}", flush=True)
            self._answer(200, json.dumps({"status": "sleeping", "level": level}, separators=(",", ":")).encode())
        elif path == "/wake_up":
            time.sleep(_Sleep.wake_delay)
            if _Sleep.fail_wake:
                self._answer(500, b'{"error": "wake failed (--fail-wake)"}')
                return True
            tags = params.get("tags") or None  # none given: wake everything, as vLLM does
            awake = _Sleep.wake(tags)
            print("standin awake" if awake else f"standin woke {tags}", flush=True)
            answer = {"status": "awake" if awake else "sleeping", "tags": tags}
            self._answer(200, json.dumps(answer, separators=(",", ":")).encode())
        elif path == "/collective_rpc":
            if json.loads(body or b"{}").get("method") == "reload_weights":
                _Sleep.weights_lost = False
            self._answer(200, b'{"results": [null]}')
        else:
            self._answer(200, b"")
        return True

    def do_GET(self) -> None:
        if self._sleep_endpoint("GET"):
            return
        if self.path == "/health":
            self._answer(200, b"")
        elif self.path == "/v1/models":
            self._answer(200, json.dumps({"data": [{"id": self.model}]}).encode())
        else:
            self._answer(404, b"")

    def do_POST(self) -> None:
        if self._sleep_endpoint("POST"):
            return
        if _Sleep.asleep():
            self._answer(503, b'{"error": {"message": "the model is asleep"}}')
            return
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if request.get("model") not in self.served:
            self._answer(404, json.dumps({"error": {"message": f"no model {request.get('model')!r}"}}).encode())
            return
        echo = {"object": "standin", "model": request["model"], "path": self.path, "pid": os.getpid()}
        if _Sleep.weights_lost:
            echo["garbage"] = True  # woken from level 2 without reload_weights
        if request.get("echo_headers"):
            echo["headers"] = {name.lower(): value for name, value in self.headers.items()}
        time.sleep(float(request.get("delay", 0.0)))  # thinking before the headers, like a long completion
        if not request.get("stream"):
            self._answer(200, json.dumps(echo).encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for number in range(int(request.get("chunks", 3))):
            time.sleep(float(request.get("interval", 0.0)))
            self._chunk(f"data: {json.dumps({**echo, 'chunk': number})}\n\n".encode())
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _spam(stream: io.TextIOBase, tag: str, count: int) -> None:
    for number in range(count):
        # A recognisable, self-checking line: tag, number, and a fixed-width payload.
        stream.write(f"{tag} {number:08d} {'x' * 64}\n")
    stream.flush()


class StandinWorkload:
    """Implements :class:`forkserver.workload.Workload` without vLLM."""

    name = "standin"

    def __init__(self) -> None:
        self._parser = _build_parser()
        self._options = WorkloadOptions()

    def configure(self, options: WorkloadOptions) -> None:
        """Only ``share_weights`` matters to the stand-in (it has no helpers to fork)."""
        self._options = options

    def preload(self, modules: list[str] | None) -> None:
        """Nothing to preload: start-up is instant (``STANDIN_PRELOAD_FAILS``: fails)."""
        failure = os.environ.get("STANDIN_PRELOAD_FAILS")
        if failure:
            raise RuntimeError(failure)

    def parse(self, argv: list[str]) -> ParsedOptions:
        """Parse with argparse; errors become :class:`OptionsError`."""
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):
                namespace = self._parser.parse_args(argv)
        except SystemExit:
            raise OptionsError(argparse_error(captured.getvalue())) from None
        return ParsedOptions(
            argv=list(argv),
            model=namespace.model,
            port=namespace.port,
            port_given=tokens_name_flag(argv, "--port"),
            host=getattr(namespace, "host", None),
            namespace=namespace,
        )

    def sleep_mode_available(self) -> bool:
        """Yes, unless ``STANDIN_NO_SLEEP_MODE=1`` (a platform without it, as vLLM on CPU)."""
        return os.environ.get("STANDIN_NO_SLEEP_MODE") != "1"

    def share_key(self, parsed: ParsedOptions, env: dict[str, str]) -> str | None:
        """With ``--share-weights-mib``: instances of one model and the same flags share a zygote."""
        args = parsed.namespace
        if not args.share_weights_mib or not self._options.share_weights:
            return None
        wanted = [args.model, args.share_weights_mib, args.zygote_load_delay, args.zygote_fail]
        return json.dumps([wanted, sorted(env.items())])

    def load_shared(self, parsed: ParsedOptions, tmpdir: str) -> None:
        """In the zygote: make the "weights" (every page written), slowly or not at all if asked."""
        global _SHARED
        args = parsed.namespace
        time.sleep(args.zygote_load_delay)
        if args.zygote_fail:
            raise RuntimeError("the stand-in's zygote was told to fail")
        _SHARED = (os.getpid(), bytearray(b"w" * (args.share_weights_mib << 20)))

    def run(self, parsed: ParsedOptions) -> int:
        """Serve ``/health`` until SIGTERM (or misbehave as asked)."""
        args = parsed.namespace
        if args.share_weights_mib:
            print(f"WEIGHTS FROM {_SHARED[0]}" if _SHARED is not None else "WEIGHTS OWN", flush=True)
            own = bytearray(b"w" * (args.share_weights_mib << 20)) if _SHARED is None else None  # noqa: F841
        for name in args.print_env:
            print(f"ENV {name}={os.environ.get(name, '<unset>')}", flush=True)
        stop = threading.Event()
        if args.ignore_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
        kept = []  # open and mapped until the instance ends, as vLLM's processes hold theirs
        if args.map_file:
            with open(args.map_file, "rb") as mapped:
                kept.append(mmap.mmap(mapped.fileno(), 0, prot=mmap.PROT_READ))
        if args.make_segment:
            fd = os.open(f"/dev/shm/{args.make_segment}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, 4096)
            kept.append(mmap.mmap(fd, 4096))
            os.close(fd)
        if args.spawn_helper and os.fork() == 0:
            # The helper sleeps until killed, like an EngineCore left behind by its server.
            while True:
                time.sleep(3600)
        if args.spam_lines:
            writers = [
                threading.Thread(target=_spam, args=(sys.stdout, "OUT", args.spam_lines)),
                threading.Thread(target=_spam, args=(sys.stderr, "ERR", args.spam_lines)),
            ]
            for writer in writers:
                writer.start()
            for writer in writers:
                writer.join()
        time.sleep(args.startup_delay)
        if args.fail_at_start:
            print(f"standin failing at start with code {args.exit_code}", flush=True)
            return int(args.exit_code)
        if args.fast:
            return _serve_fast(args, stop)
        _Health.model = args.model
        _Health.served = args.served_model_name or [args.model]
        _Sleep.enabled, _Sleep.wake_delay, _Sleep.fail_wake = args.enable_sleep_mode, args.wake_delay, args.fail_wake
        server = ThreadingHTTPServer((args.host or "0.0.0.0", args.port), _Health)
        server.daemon_threads = True
        server.timeout = 0.1
        print(f"standin serving {args.model} on port {args.port}", flush=True)
        started = time.monotonic()
        while not stop.is_set():
            server.handle_request()
            if args.crash_after is not None and time.monotonic() - started >= args.crash_after:
                print(f"standin crashing with code {args.exit_code}", flush=True)
                return int(args.exit_code)
        server.server_close()
        print("standin stopped", flush=True)
        return 0


def _serve_fast(args: argparse.Namespace, stop: threading.Event) -> int:
    """The synthetic upstream of the front door's benchmark: the same answers, from asyncio."""
    import asyncio

    served = set(args.served_model_name or [args.model])
    posts = [0]
    keep_alive = args.keep_alive_timeout or float(os.environ.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE") or 5.0)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), keep_alive)
                except TimeoutError:
                    writer.close()  # idle too long: closed, as uvicorn closes a kept-alive connection
                    return
                request_line, _, header_block = head.partition(b"\r\n")
                method, path = request_line.split(b" ")[:2]
                length = 0
                for line in header_block.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                request = json.loads(await reader.readexactly(length) or b"{}") if length else {}
                if method == b"POST":
                    posts[0] += 1
                if method == b"GET" and path == b"/requests":
                    writer.write(_fast_whole("200 OK", json.dumps({"posts": posts[0]}).encode())[0])
                    continue
                if isinstance(request.get("script"), list):
                    if not await _play(request["script"], writer):
                        return
                    continue
                parts = _fast_answer(method, path, request, served, args.model)
                if request.get("paced"):  # each event its own write, as vLLM sends each token
                    for part in parts:
                        writer.write(part)
                        await writer.drain()
                        await asyncio.sleep(0)
                else:
                    writer.write(b"".join(parts))
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(answer, args.host or "0.0.0.0", args.port)
        print(f"standin serving {args.model} on port {args.port} (fast)", flush=True)
        while not stop.is_set():
            await asyncio.sleep(0.1)
        server.close()

    asyncio.run(main())
    print("standin stopped", flush=True)
    return 0


async def _play(script: list[object], writer: Any) -> bool:
    """Send what a request's ``script`` says, byte for byte; False once it closed the connection."""
    import asyncio

    for step in script:
        if not isinstance(step, dict):
            continue
        if "send" in step:
            writer.write(str(step["send"]).encode("latin-1"))
            await writer.drain()
        elif "sleep" in step:
            await asyncio.sleep(float(step["sleep"]))
        elif step.get("close"):
            writer.close()
            return False
    return True


def _fast_whole(status: str, body: bytes, content_type: bytes = b"application/json") -> list[bytes]:
    return [f"HTTP/1.1 {status}\r\ncontent-type: ".encode() + content_type
            + f"\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body]  # fmt: skip


def _fast_answer(method: bytes, path: bytes, request: dict[str, object], served: set[str], model: str) -> list[bytes]:
    whole = _fast_whole
    if method == b"GET":
        if path == b"/health":
            return whole("200 OK", b"")
        return whole("200 OK", json.dumps({"data": [{"id": model}]}).encode())
    if request.get("model") not in served:
        return whole("404 Not Found", b'{"error": {"message": "no such model"}}')
    if not request.get("stream"):
        return whole("200 OK", json.dumps({"object": "standin", "model": request["model"]}).encode())
    parts = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"]
    chunks = request.get("chunks", 3)
    for number in range(chunks if isinstance(chunks, int) else 3):
        event = f"data: {json.dumps({'model': request['model'], 'chunk': number})}\n\n".encode()
        parts.append(f"{len(event):x}\r\n".encode() + event + b"\r\n")
    parts.append(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
    return parts


WORKLOAD = StandinWorkload()
