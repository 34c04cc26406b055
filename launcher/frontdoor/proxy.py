"""``POST /v1/...``: route by the body's ``model`` and pass the request through, at line rate.

A plain ASGI endpoint (no Request object, no response class, no task group): the body is read
in one piece, parsed once for ``model`` and ``stream``, the model's instance held (started
first if needed), and the request written to a pooled keep-alive connection
(:mod:`launcher.frontdoor.upstream`). Status, headers and body come back as the instance
sends them; body pieces that arrive together go on as one. One task per request watches for
the client hanging up, which closes the upstream connection so that vLLM aborts the request.

A stream waiting for its model's start may be kept alive (``start_keepalive``): its headers
go out at once, then an SSE comment line every few seconds (``: starting tiny, compiling,
4 s``) until the first real chunk; a failed start ends it with an OpenAI-shaped error event.

Why this module is long: one request's exchange (read the body, hold the instance, start it if
needed, relay the answer with back-pressure, keep a waiting stream alive, cut a stalled client,
retry once on a dead instance) is one sequence of steps whose error paths depend on each other;
the connection itself is upstream.py, the bookkeeping door.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from launcher.errors import NotFound
from launcher.frontdoor import upstream
from launcher.frontdoor.core import LOST_WAIT_SECONDS
from launcher.frontdoor.door import FrontDoor
from launcher.frontdoor.errors import dot_segment_error, has_dot_segment, openai_error
from launcher.frontdoor.model_state import InsufficientMemory, Lease, ModelInvalid, ModelState, NoRoom, StartFailed
from launcher.frontdoor.upstream import Connection, UpstreamError, UpstreamPool, UpstreamTimeout
from launcher.instances import readiness
from launcher.instances.config import did_you_mean
from launcher.request_body import read_capped

log = logging.getLogger("launcher.front_door")
T = TypeVar("T")

# Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy sets itself; everything else passes.
REQUEST_HEADERS_DROPPED = frozenset(
    {b"host", b"content-length", b"authorization", b"connection", b"keep-alive", b"transfer-encoding", b"te",
     b"upgrade", b"proxy-authorization", b"proxy-connection", b"expect"}
)  # fmt: skip
RESPONSE_HEADERS_DROPPED = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"proxy-connection", b"date", b"server"}
)
UNKNOWN_MODEL_LABEL = "(unknown)"  # the metrics label for names no profile has
RETRY_AFTER_SECONDS = "5"
KEEPALIVE_INTERVAL = 3.0  # seconds between SSE comments while a stream waits for its start
FRESH_STARTS = 2  # times one request may start its model afresh after instances that died before answering
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]  # fmt: skip


def passed_headers(headers: Iterable[tuple[bytes, bytes]], dropped: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """``headers`` less the hop-by-hop ones: ``dropped`` and those the ``Connection`` header names."""
    headers = [(name.lower(), value) for name, value in headers]
    named = {token.strip().lower() for name, value in headers if name == b"connection" for token in value.split(b",")}
    if named:
        dropped = dropped | named
    return [(name, value) for name, value in headers if name not in dropped]


def read_request(body: bytes) -> tuple[str, bool] | JSONResponse:
    """The body's ``model`` and whether it asks for a stream, or the OpenAI-shaped 400."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return openai_error(400, f"The request body is not valid JSON: {exc}", "BadRequestError", "invalid_json")
    except RecursionError:
        return openai_error(400, "The request body is nested too deeply to read.", "BadRequestError", "invalid_json")
    if not isinstance(data, dict):
        return openai_error(400, "The request body must be a JSON object.", "BadRequestError", "invalid_body")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        return openai_error(400, "The request body must name a model: add \"model\": \"<name>\" "
                            "(GET /v1/models lists them).", "BadRequestError", "model_required")  # fmt: skip
    return model, data.get("stream") is True


class _Exchange:
    """One request's hold on its model (``lease``: released once, by whoever ends the request) and
    on its upstream connection, so that a client's hang-up can close it."""

    __slots__ = ("_gone_waiter", "connection", "gone", "lease")

    def __init__(self, lease: Lease) -> None:
        self.lease: Lease | None = lease
        self.connection: Connection | None = None
        self.gone = False
        self._gone_waiter: asyncio.Future[None] | None = None  # made only when something waits for it

    def attach(self, connection: Connection) -> None:
        self.connection = connection
        if self.gone:
            connection.close()

    def client_left(self) -> None:
        self.gone = True
        if self.connection is not None:
            self.connection.close()  # wakes the reader; the instance sees its request aborted
        if self._gone_waiter is not None and not self._gone_waiter.done():
            self._gone_waiter.set_result(None)

    async def unless_gone(self, work: Awaitable[T], tick: Callable[[], Awaitable[None]] | None = None) -> T | None:
        """``work``'s result, or None (``work`` cancelled) if the client hangs up first; ``tick``
        is awaited every ``KEEPALIVE_INTERVAL`` seconds meanwhile (a kept-alive stream's comment)."""
        task = asyncio.ensure_future(work)
        if not self.gone:
            gone = self._gone_waiter = asyncio.get_running_loop().create_future()
            while True:
                done, _ = await asyncio.wait([task, gone], timeout=KEEPALIVE_INTERVAL if tick else None,
                                             return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if done or tick is None:
                    break
                await tick()
        return await _result_or_none(task)


async def _watch_client(receive: Receive, on_gone: Callable[[], None]) -> None:
    # The body is read already: the next message is http.disconnect (a hang-up, or the answer's end).
    while (await receive())["type"] != "http.disconnect":
        pass
    on_gone()


async def _unless_client_leaves(receive: Receive, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None (``work`` cancelled) if the client hangs up first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_watch_client(receive, lambda: None))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    return await _result_or_none(task)


async def _result_or_none(task: asyncio.Future[T]) -> T | None:
    """A finished task's result; an unfinished one is cancelled (None)."""
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


@dataclass(frozen=True)
class _Failure:
    """What the front door answers instead of the instance: a JSON error, or, once a stream's
    headers are out, the same error as an SSE event. Status 499: the client left, nothing to send."""

    status: int
    message: str = ""
    type: str = "ServiceUnavailableError"
    code: str | None = None
    headers: Mapping[str, str] | None = None

    async def answer(self, scope: Scope, receive: Receive, send: Send, *, headers_sent: bool) -> int:
        if self.status == 499:
            pass
        elif headers_sent:
            await send({"type": "http.response.body", "body": _error_event(self.message, self.code, self.type),
                        "more_body": False})  # fmt: skip
        else:
            await openai_error(self.status, self.message, self.type, self.code, self.headers)(scope, receive, send)
        return self.status


CLIENT_LEFT = _Failure(499)


class OpenAIProxy:
    """The ASGI endpoint of ``POST /v1/{path}`` (the front door, its settings and pool on ``app.state``)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state_of_app = scope["app"].state
        door: FrontDoor = state_of_app.front_door
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if has_dot_segment(raw_path):
            await dot_segment_error()(scope, receive, send)
            return
        cap = state_of_app.settings.proxy_max_body_bytes
        try:
            body = await read_capped(scope, receive, cap)
        except ClientDisconnect:
            return
        if body is None:
            await openai_error(413, f"The request body exceeds the {cap}-byte limit.", "BadRequestError",
                               "request_too_large")(scope, receive, send)  # fmt: skip
            return
        parsed = read_request(body)
        if isinstance(parsed, JSONResponse):
            await parsed(scope, receive, send)
            return
        model, stream = parsed
        state = door.resolve(model)
        if state is None:
            door.metrics.count_request(UNKNOWN_MODEL_LABEL, 404)
            hint = did_you_mean(model, [label for label, _ in door.labels()])
            await openai_error(404, f"The model '{model}' does not exist{hint} (GET /v1/models lists them).",
                               "NotFoundError", "model_not_found")(scope, receive, send)  # fmt: skip
            return
        lease = door.try_acquire(state)  # a ready model: no waiting, no task
        try:
            if lease is None and stream and door.keeps_alive(state):
                status = await _KeptAlive(scope, receive, send, door, state).serve(body)
            elif lease is None:
                status = await self._acquire_then_pass(scope, receive, send, door, state, body)
            else:
                status = await _pass(scope, receive, send, door, lease, body)
        except AnswerCut as cut:
            door.metrics.count_request(state.name, cut.status)
            raise
        door.metrics.count_request(state.name, status)

    @staticmethod
    async def _acquire_then_pass(
        scope: Scope, receive: Receive, send: Send, door: FrontDoor, state: ModelState, body: bytes
    ) -> int:
        try:
            lease = await _unless_client_leaves(receive, door.acquire(state))
        except (StartFailed, NoRoom, NotFound, ModelInvalid) as exc:
            return await _acquire_failure(exc).answer(scope, receive, send, headers_sent=False)
        if lease is None:  # the client left while it waited: it is out of the queue, nothing to send
            return CLIENT_LEFT.status
        return await _pass(scope, receive, send, door, lease, body)


def _acquire_failure(exc: Exception) -> _Failure:
    if isinstance(exc, ModelInvalid):  # the node's configuration, not the client: at once, no Retry-After
        return _Failure(503, str(exc), code="model_invalid")
    if isinstance(exc, InsufficientMemory):  # it will not fit later either: no Retry-After
        return _Failure(503, str(exc), code="insufficient_memory")
    if isinstance(exc, StartFailed):
        return _Failure(502, str(exc), "InternalServerError", code="model_start_failed")
    if isinstance(exc, NoRoom):
        return _Failure(503, str(exc), code="no_room", headers={"Retry-After": RETRY_AFTER_SECONDS})
    return _Failure(404, str(exc), "NotFoundError", "model_not_found")


def _request_head(scope: Scope, lease: Lease, host: str, length: int) -> bytes:
    # The path as the client sent it (still percent-encoded), not as decoded for routing.
    target: bytes = scope.get("raw_path") or scope["path"].encode()
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    lines = [b"POST ", target, b" HTTP/1.1\r\nhost: ", f"{host}:{lease.record.port}".encode(),
             b"\r\ncontent-length: ", str(length).encode(), b"\r\n"]  # fmt: skip
    for name, value in passed_headers(scope["headers"], REQUEST_HEADERS_DROPPED):
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


KEEPALIVE_ENV = "VLLM_HTTP_TIMEOUT_KEEP_ALIVE"  # vLLM's own setting (its uvicorn's keep-alive; 5 s by default)
KEEPALIVE_MARGIN = 2.0  # seconds under the instance's keep-alive that a connection stops being reused


def reuse_limit(env_vars: Mapping[str, str] | None, launcher_env: Mapping[str, str] | None = None) -> float:
    """How long a connection to an instance with this environment may idle and still be reused:
    its keep-alive less a margin, at most :data:`upstream.IDLE_SECONDS` (0: not reused)."""
    raw = env_vars.get(KEEPALIVE_ENV) if env_vars else None
    if raw is None and launcher_env is None:
        return _LAUNCHER_REUSE_LIMIT  # the hot path: read once
    raw = raw or (launcher_env if launcher_env is not None else os.environ).get(KEEPALIVE_ENV)
    try:
        keepalive = float(raw) if raw else 5.0
    except ValueError:
        keepalive = 5.0
    return max(0.0, min(upstream.IDLE_SECONDS, keepalive - KEEPALIVE_MARGIN))


_LAUNCHER_REUSE_LIMIT = reuse_limit(None, os.environ)  # instances inherit the launcher's environment


async def _open(scope: Scope, lease: Lease, body: bytes, exchange: _Exchange) -> Connection | UpstreamError:
    """Send the request to the lease's instance; its connection once the answer's head is in."""
    pool: UpstreamPool = scope["app"].state.upstream_pool
    host = readiness.probe_host(lease.record.host)  # "[::1]" for IPv6: right for Host, not for connect
    try:
        return await pool.request(host.strip("[]"), lease.record.port, _request_head(scope, lease, host, len(body)),
                                  body, on_connection=exchange.attach,
                                  max_idle=reuse_limit(lease.record.config.env_vars))  # fmt: skip
    except UpstreamError as exc:
        return exc


async def _open_or_start_afresh(
    scope: Scope, door: FrontDoor, body: bytes, exchange: _Exchange, tick: Callable[[], Awaitable[None]] | None
) -> Connection | _Failure:
    """The request sent to the instance of ``exchange.lease``, and the answer's head in.

    An instance that died before answering (crashed, or killed) is never the client's problem:
    whatever it did with the request died with it, so the model is started afresh and the request
    sent to the new instance (at most ``FRESH_STARTS`` times; ``tick`` keeps a kept-alive stream
    hearing from it meanwhile). An instance that is alive but did not answer is a 502, and the
    request is not sent again. ``exchange.lease`` is the lease held at the end (None: none).
    """
    fresh_starts, unreachable_since = 0, None
    while True:
        lease = exchange.lease
        assert lease is not None
        opened = await _open(scope, lease, body, exchange)
        if not isinstance(opened, UpstreamError):
            return opened
        if exchange.gone:
            return CLIENT_LEFT
        failure = _Failure(502, f"The model's instance {lease.record.instance_id} did not answer: {opened}",
                           "InternalServerError", code="upstream_unreachable")  # fmt: skip
        if isinstance(opened, UpstreamTimeout) or fresh_starts == FRESH_STARTS:
            return failure
        if not opened.request_sent and not door.reported_gone(lease):
            # No connection: the request is not there, so trying again is safe. An instance that stopped
            # listening is usually exiting: its exit is waited for a moment, then it is started afresh.
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since < LOST_WAIT_SECONDS:
                await asyncio.sleep(0.1)
                continue
            return failure
        if not await door.lost_before_answering(lease):  # it lives: it may have the request; not sent twice
            return failure
        fresh_starts, unreachable_since = fresh_starts + 1, None
        exchange.lease = None
        door.release(lease)
        log.warning("model %s: its instance %s died before answering a request: starting it afresh",
                    lease.state.name, lease.record.instance_id)  # fmt: skip
        try:
            exchange.lease = await exchange.unless_gone(door.acquire(lease.state), tick)
        except (StartFailed, NoRoom, NotFound, ModelInvalid) as exc:
            return _acquire_failure(exc)
        if exchange.lease is None:
            return CLIENT_LEFT


async def _pass(
    scope: Scope,
    receive: Receive,
    send: Send,
    door: FrontDoor,
    lease: Lease,
    body: bytes,
    *,
    headers_sent: bool = False,
    tick: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Pass the request to the lease's instance and its answer back; the lease is given back.

    ``headers_sent``: a kept-alive stream's headers are out already, so the instance's answer
    goes on as its body, and an error (one the instance answers, too) as an SSE error event;
    ``tick`` sends it a comment while a fresh start is waited for.
    """
    exchange = _Exchange(lease)
    watcher = asyncio.ensure_future(_watch_client(receive, exchange.client_left))
    connection: Connection | None = None
    try:
        opened = await _open_or_start_afresh(scope, door, body, exchange, tick)
        if isinstance(opened, _Failure):
            return await opened.answer(scope, receive, send, headers_sent=headers_sent)
        assert exchange.lease is not None
        lease, connection = exchange.lease, opened
        if headers_sent and connection.status != 200:  # vLLM refused it (a bad parameter)
            await send({"type": "http.response.body", "body": await _error_event_from(connection), "more_body": False})
            return connection.status
        if not headers_sent:
            await send({"type": "http.response.start", "status": connection.status,
                        "headers": passed_headers(connection.headers, RESPONSE_HEADERS_DROPPED)})  # fmt: skip
        await _relay(send, connection, door, lease, exchange, scope["app"].state.settings.proxy_read_timeout)
        return connection.status
    finally:
        watcher.cancel()
        if connection is not None:
            scope["app"].state.upstream_pool.release(connection)
        if exchange.lease is not None:
            door.release(exchange.lease)


class AnswerCut(Exception):
    """The instance broke off an answer whose head is out: the client's connection is cut (raised
    to the server, which closes it), so that the client sees an incomplete answer, not a short one.
    Expected, not a bug: :class:`QuietAnswerCut` keeps the server from logging a traceback for it."""

    def __init__(self, status: int) -> None:
        super().__init__(f"answer cut off (status {status})")
        self.status = status


class QuietAnswerCut(logging.Filter):
    """Drops the server's "Exception in ASGI application" record for an :class:`AnswerCut` (the
    proxy has said what happened, in one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], AnswerCut))


QUIET_ANSWER_CUT = QuietAnswerCut()


class _ClientStall:
    """Cuts an answer whose client has taken nothing for ``timeout`` seconds (``--proxy-read-timeout``,
    as for a silent instance): a client that stops reading must not hold its model for ever (idle
    stop, sleep and eviction wait for its request). No timer per answer: one sweep a second looks
    at the answers being sent (:data:`_SENDING`), the hot path only notes when a send begins."""

    __slots__ = ("_task", "sending_since", "stalled", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.sending_since: float | None = None
        self.stalled = False
        self._task = asyncio.current_task()

    async def send(self, send: Send, message: dict[str, Any]) -> None:
        if self.timeout <= 0:
            await send(message)
            return
        self.sending_since = time.monotonic()
        _SENDING.add(self)
        _sweep_soon()
        try:
            await send(message)
        finally:
            self.sending_since = None
            _SENDING.discard(self)

    def cut_if_stalled(self, now: float) -> None:
        since = self.sending_since
        if since is not None and now - since >= self.timeout and self._task is not None and not self.stalled:
            self.stalled = True
            self._task.cancel()


_SENDING: set[_ClientStall] = set()  # answers whose send to their client is under way
_sweep: list[tuple[asyncio.AbstractEventLoop, asyncio.TimerHandle]] = []  # the one sweep timer, and its loop


def _sweep_soon() -> None:
    loop = asyncio.get_running_loop()
    if _sweep and _sweep[0][0] is loop:
        return
    _sweep[:] = [(loop, loop.call_later(1.0, _sweep_stalls))]  # a handle of an ended loop never fires


def _sweep_stalls() -> None:
    _sweep.clear()
    now = time.monotonic()
    for stall in list(_SENDING):
        stall.cut_if_stalled(now)
    if _SENDING:
        _sweep_soon()


async def _relay(send: Send, connection: Connection, door: FrontDoor, lease: Lease, exchange: _Exchange,
                 client_timeout: float) -> None:  # fmt: skip
    """The answer's body, piece by piece; an instance failing mid-answer ends it, said once.

    A stream of events gets an error event and a proper end (OpenAI's clients read it); any other
    answer is cut (:class:`AnswerCut`): its length or its chunks must not look complete. A client
    that takes nothing for ``client_timeout`` seconds is cut too.
    """
    stall = _ClientStall(client_timeout)
    try:
        await _relay_body(stall, send, connection, door, lease, exchange)
    except asyncio.CancelledError:
        if not stall.stalled:
            raise
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        connection.close()  # the instance sees its request aborted
        log.warning("model %s: a client took nothing of its answer for %gs: cut", lease.state.name, client_timeout)
        raise AnswerCut(connection.status) from None


async def _relay_body(stall: _ClientStall, send: Send, connection: Connection, door: FrontDoor, lease: Lease,
                      exchange: _Exchange) -> None:  # fmt: skip
    try:
        while True:
            data = await connection.read()
            if data is None:
                break
            if connection.complete and not exchange.gone:
                await stall.send(send, {"type": "http.response.body", "body": data, "more_body": False})
                return
            await stall.send(send, {"type": "http.response.body", "body": data, "more_body": True})
    except UpstreamError as exc:
        if exchange.gone:
            return  # the client left: closing the connection was ours
        what = "stopped sending (read timeout)" if isinstance(exc, UpstreamTimeout) else f"failed: {exc}"
        message = f"The model's instance {lease.record.instance_id} {what} in the middle of its answer."
        log.warning("model %s: %s", lease.state.name, message)
        door.metrics.upstream_errors.labels(model=lease.state.name).inc()
        if not _is_event_stream(connection.headers):
            raise AnswerCut(connection.status) from None
        await stall.send(send, {"type": "http.response.body", "body": _error_event(message, "upstream_failed"),
                                "more_body": True})  # fmt: skip
    await stall.send(send, {"type": "http.response.body", "body": b"", "more_body": False})


def _is_event_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"content-type" and value.startswith(b"text/event-stream") for name, value in headers)


def _error_event(message: str, code: str | None, error_type: str = "ServiceUnavailableError") -> bytes:
    error = {"error": {"message": message, "type": error_type, "code": code}}
    return f"data: {json.dumps(error)}\n\n".encode()


class _KeptAlive:
    """A stream whose model is starting: headers at once, comments while it starts, then the stream."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, door: FrontDoor, state: ModelState) -> None:
        self._scope, self._receive, self._send = scope, receive, send
        self._door, self._state = door, state

    async def _comment(self, started: float) -> None:
        progress = self._door.start_progress(self._state)
        line = f": starting {self._state.name}, {progress}, {time.monotonic() - started:.0f} s\n\n"
        await self._send({"type": "http.response.body", "body": line.encode(), "more_body": True})

    async def serve(self, body: bytes) -> int:
        started = time.monotonic()
        await self._send({"type": "http.response.start", "status": 200, "headers": list(_SSE_HEADERS)})
        await self._comment(started)
        watcher = asyncio.ensure_future(_watch_client(self._receive, lambda: None))
        acquiring = asyncio.ensure_future(self._door.acquire(self._state))
        try:
            while True:
                await asyncio.wait({acquiring, watcher}, timeout=KEEPALIVE_INTERVAL,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if acquiring.done() or watcher.done():
                    break
                await self._comment(started)
        finally:
            watcher.cancel()
        if not acquiring.done():  # the client left while it waited
            acquiring.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await acquiring
            return CLIENT_LEFT.status
        try:
            lease = acquiring.result()
        except (StartFailed, NoRoom, NotFound, ModelInvalid) as exc:
            return await _acquire_failure(exc).answer(self._scope, self._receive, self._send, headers_sent=True)
        return await _pass(self._scope, self._receive, self._send, self._door, lease, body, headers_sent=True,
                           tick=lambda: self._comment(started))  # fmt: skip


async def _error_event_from(connection: Connection) -> bytes:
    """An instance's error answer, whose status can no longer be sent, as an SSE error event."""
    parts = []
    with contextlib.suppress(UpstreamError):
        while (data := await connection.read()) is not None:
            parts.append(data)
    text = b"".join(parts)[:65536].decode(errors="replace")
    error: Any = None
    with contextlib.suppress(ValueError, AttributeError):
        error = json.loads(text).get("error")
    if not isinstance(error, dict):
        error = {"message": text or f"HTTP {connection.status}", "type": "BadRequestError", "code": None}
    return f"data: {json.dumps({'error': error})}\n\n".encode()
