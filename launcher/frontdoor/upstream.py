"""Pooled keep-alive HTTP/1.1 connections from the front door to its instances.

The proxy's hot path, kept short: a request is one ``transport.write``; the answer is parsed
by httptools (the C parser uvicorn uses) as it arrives, and its body handed on in the pieces
it came in, joined into one when the reader is behind. Per request there is no client, no
task and no parser to set up beyond a pooled connection's own state, and per piece of body
no more than a parser callback and one wake-up.

A request is written once and never again: a POST is not idempotent (RFC 9110 9.2.2), and an
instance that got it may be generating already. The race a pool of keep-alive connections is
known for (the instance closing an idle connection just as a request is written on it) is kept
away instead: a connection is not reused once it has been idle for ``IDLE_SECONDS``, well before
the instance's own keep-alive timeout (uvicorn's default, which vLLM uses, is 5 s). Idle
connections are dropped when they close or grow old, so nothing is kept for an instance that is
gone.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import cast

import httptools

HIGH_WATER = 1 << 20  # bytes read from an instance and not passed on yet: reading pauses above
IDLE_SECONDS = 3.0  # a pooled connection idle longer is closed, not reused (vLLM's uvicorn closes at 5 s)
MAX_IDLE_PER_TARGET = 256


class UpstreamError(Exception):
    """The instance could not be reached, or broke off its answer; the message says which.

    ``request_sent``: whether any of the request may have reached the instance (False only when
    no connection could be made): only then is it certain the instance did not act on it.
    """

    def __init__(self, message: str, *, request_sent: bool = True) -> None:
        super().__init__(message)
        self.request_sent = request_sent


class UpstreamTimeout(UpstreamError):
    """The instance sent nothing for ``--proxy-read-timeout`` seconds."""


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection to an instance: one request at a time, kept alive for the next."""

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0  # when its last answer ended (the instance's keep-alive timer starts then)
        self.max_idle = IDLE_SECONDS  # reused only while idle less than this (see UpstreamPool.request)
        self.on_idle_lost: Callable[[Connection], None] | None = None  # set while it waits in the pool
        self._outstanding = False  # a request is written and its answer not whole yet
        self._stray = False  # the instance sent more than the answer asked for
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._read_timeout = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self._until_close = False  # an answer with neither length nor chunks ends with the connection
        self._interim = False  # parsing a 1xx answer, which is dropped
        self.error: UpstreamError | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._last_read = time.monotonic()

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self._last_read = time.monotonic()
        if not self._outstanding:  # bytes nobody asked for (while idle in the pool): never someone's answer
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the instance switched protocols, which the front door never asks for"))
            self.close()
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the instance's answer is not valid HTTP: {exc}"))
            self.close()
        if self._stray:  # a second answer after the one asked for: the connection is out of step
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if self.on_idle_lost is not None:
            self.on_idle_lost(self)  # the pool lets it go at once
        if self._until_close and not self.complete and self.error is None:
            self.complete = True  # its end is the connection's end
            self._wake()
        if not self.complete:
            self._fail(UpstreamError("the instance closed the connection" + (f": {exc}" if exc else "")))

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            self._stray = True  # the answer to this request is whole: what begins now answers nothing

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._stray:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._stray:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # interim (100 Continue, 103 Early Hints): the answer follows
            self.headers, self._interim = [], True
            return
        if status == 101:  # the proxy drops Upgrade: a switch is nothing a client of it could use
            self._fail(UpstreamError("the instance switched protocols (101), which the front door never asks for"))
            return
        self.status = status
        self.head_done = True
        framed = any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self.headers)
        self._until_close = not framed and self.status not in (204, 304) and self.status >= 200
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._stray:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()  # the client reads slower than the instance writes
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._stray:
            return
        self.complete = True
        self._outstanding = False
        self.idle_since = time.monotonic()
        self.keep_alive = self._parser.should_keep_alive()
        self._cancel_timer()
        self._wake()

    # ------------------------------------------------------------------ the request

    def send(self, head: bytes, body: bytes, read_timeout: float) -> None:
        """Write one request; the answer is read with :meth:`read_head` and :meth:`read`."""
        assert self.transport is not None
        self._reset()
        self._outstanding = True
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)  # not copied into one buffer with the head
        self._read_timeout = read_timeout
        if read_timeout > 0:
            self._timer = self._loop.call_later(read_timeout, self._check_silence)

    async def read_head(self) -> None:
        """Wait for the status line and headers (``status`` and ``headers`` then)."""
        while not self.head_done:
            if self.error is not None:
                raise self.error
            waiter = self._waiter = self._loop.create_future()
            await waiter

    async def read(self) -> bytes | None:
        """The body that has arrived since the last call (waiting for some); None at its end."""
        while True:
            if self._chunks:
                chunks = self._chunks
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._paused and self.transport is not None:
                    self._paused = False
                    self._last_read = time.monotonic()  # silence counts from here, not from the pause
                    self.transport.resume_reading()
                return data
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            waiter = self._waiter = self._loop.create_future()
            await waiter  # woken by the next piece, the end, or an error

    def close(self) -> None:
        """Close the connection (an instance sees its request aborted)."""
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ internals

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # a reader cancelled meanwhile leaves a cancelled future
                waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _check_silence(self) -> None:
        # One timer per silence period, not one per piece of body: rescheduled from the last read.
        self._timer = None
        if self.complete or self.closed:
            return
        if self._paused:  # the client reads slowly: the instance is waiting for us, not silent
            self._timer = self._loop.call_later(self._read_timeout, self._check_silence)
            return
        silent = time.monotonic() - self._last_read
        if silent >= self._read_timeout:
            self._fail(UpstreamTimeout(f"the instance sent nothing for {self._read_timeout:g}s"))
            self.close()
        else:
            self._timer = self._loop.call_later(self._read_timeout - silent, self._check_silence)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class UpstreamPool:
    """Idle keep-alive connections per instance address, and requests over them."""

    def __init__(self, *, connect_timeout: float, read_timeout: float) -> None:
        self._idle: dict[tuple[str, int], list[Connection]] = {}
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._prune_timer: asyncio.TimerHandle | None = None
        self.opened = 0  # connections made, and requests sent on a kept-alive one: /metrics shows both
        self.reused = 0

    async def request(
        self,
        host: str,
        port: int,
        head: bytes,
        body: bytes,
        *,
        on_connection: Callable[[Connection], None],
        max_idle: float = IDLE_SECONDS,
    ) -> Connection:
        """Send a request to ``host:port``; the connection once the answer's head is in.

        The request is sent once, never again (see the module's docstring). Raises
        :class:`UpstreamError`; the caller gives the connection back with :meth:`release`.
        ``on_connection`` learns the connection before the wait for its answer (so that a client
        hanging up can close it). ``max_idle``: how long a connection to this instance may have
        been idle and still be reused (well under the instance's keep-alive; 0: never reused).
        """
        key = (host, port)
        connection = self._take(key, max_idle) or await self._connect(key)
        connection.max_idle = max_idle
        on_connection(connection)
        if connection.closed:
            raise UpstreamError("the request was given up", request_sent=False)
        connection.send(head, body, self._read_timeout)
        try:
            await connection.read_head()
        except BaseException:
            connection.close()  # failed, or cancelled: the client left before the answer began
            raise
        return connection

    def release(self, connection: Connection) -> None:
        """Keep ``connection`` for the next request if its answer was read to the end."""
        idle = self._idle.setdefault(connection.key, [])
        if (connection.complete and connection.keep_alive and not connection.closed and connection.max_idle > 0
                and len(idle) < MAX_IDLE_PER_TARGET):  # fmt: skip
            connection.on_idle_lost = self._drop
            idle.append(connection)
            if self._prune_timer is None:
                self._prune_timer = asyncio.get_running_loop().call_later(IDLE_SECONDS, self._prune)
        else:
            if not idle:
                del self._idle[connection.key]
            connection.close()

    def idle_connections(self) -> dict[tuple[str, int], int]:
        """How many idle connections are kept, per address (every one of them reusable)."""
        return {key: len(idle) for key, idle in self._idle.items()}

    def close(self) -> None:
        """Close every idle connection (at shutdown)."""
        if self._prune_timer is not None:
            self._prune_timer.cancel()
            self._prune_timer = None
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.on_idle_lost = None
                connection.close()

    def _take(self, key: tuple[str, int], max_idle: float) -> Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        found = None
        while idle and found is None:
            connection = idle.pop()
            connection.on_idle_lost = None
            transport = connection.transport
            if not connection.closed and transport is not None and not transport.is_closing() \
                    and now - connection.idle_since < min(max_idle, IDLE_SECONDS):  # fmt: skip
                found = connection
            else:
                connection.close()
        if idle is not None and not idle:
            del self._idle[key]
        if found is not None:
            self.reused += 1
        return found

    def _drop(self, connection: Connection) -> None:
        """An idle connection closed (by the instance, or because it is gone): forget it."""
        connection.on_idle_lost = None
        idle = self._idle.get(connection.key)
        if idle is not None and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.key]

    def _prune(self) -> None:
        """Close the connections idle too long to be reused; look again while any are kept."""
        self._prune_timer = None
        deadline = time.monotonic() - IDLE_SECONDS
        for key, idle in list(self._idle.items()):
            kept = [connection for connection in idle if connection.idle_since > deadline and not connection.closed]
            for connection in idle:
                if connection not in kept:
                    connection.on_idle_lost = None
                    connection.close()
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        if self._idle:
            oldest = min(connection.idle_since for idle in self._idle.values() for connection in idle)
            delay = max(0.05, oldest + IDLE_SECONDS - time.monotonic())
            self._prune_timer = asyncio.get_running_loop().call_later(delay, self._prune)

    async def _connect(self, key: tuple[str, int]) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: Connection(key), key[0], key[1]), self._connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {key[0]}:{key[1]}: {exc or 'timed out'}", request_sent=False) from None
        self.opened += 1
        return connection
