"""Pooled keep-alive HTTP/1.1 connections from the front door to its instances.

The proxy's hot path, kept short: a request is one ``transport.write``; the answer is parsed
by httptools (the C parser uvicorn uses) as it arrives, and its body handed on in the pieces
it came in, joined into one when the reader is behind. Per request there is no client, no
task and no parser to set up beyond a pooled connection's own state, and per piece of body
no more than a parser callback and one wake-up.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import cast

import httptools

HIGH_WATER = 1 << 20  # bytes read from an instance and not passed on yet: reading pauses above
IDLE_SECONDS = 3.0  # a pooled connection idle longer is closed (vLLM's uvicorn closes at 5 s)
MAX_IDLE_PER_TARGET = 256


class UpstreamError(Exception):
    """The instance could not be reached, or broke off its answer; the message says which."""


class UpstreamTimeout(UpstreamError):
    """The instance sent nothing for ``--proxy-read-timeout`` seconds."""


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection to an instance: one request at a time, kept alive for the next."""

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False  # taken from the pool: it may race the instance's idle close
        self.idle_since = 0.0
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
        self.got_bytes = False
        self._until_close = False  # an answer with neither length nor chunks ends with the connection
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
        self.got_bytes = True
        self._last_read = time.monotonic()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the instance's answer is not valid HTTP: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if self._until_close and not self.complete and self.error is None:
            self.complete = True  # its end is the connection's end
            self._wake()
        if not self.complete:
            self._fail(UpstreamError("the instance closed the connection" + (f": {exc}" if exc else "")))

    # ------------------------------------------------------------------ httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.head_done = True
        framed = any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self.headers)
        self._until_close = not framed and self.status not in (204, 304) and self.status >= 200
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()  # the client reads slower than the instance writes
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()
        self._cancel_timer()
        self._wake()

    # ------------------------------------------------------------------ the request

    def send(self, head: bytes, body: bytes, read_timeout: float) -> None:
        """Write one request; the answer is read with :meth:`read_head` and :meth:`read`."""
        assert self.transport is not None
        self._reset()
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

    async def request(
        self, host: str, port: int, head: bytes, body: bytes, *, on_connection: Callable[[Connection], None]
    ) -> Connection:
        """Send a request to ``host:port``; the connection once the answer's head is in.

        A pooled connection the instance closed as it went idle (nothing was read from it) is
        retried once on a new one: the instance never saw that request. Raises
        :class:`UpstreamError`; the caller gives the connection back with :meth:`release`.
        ``on_connection`` learns each connection used, before the wait for its answer (so that
        a client hanging up can close it).
        """
        key = (host, port)
        while True:
            connection = self._take(key) or await self._connect(key)
            on_connection(connection)
            if connection.closed:
                raise UpstreamError("the request was given up")
            connection.send(head, body, self._read_timeout)
            try:
                await connection.read_head()
            except UpstreamError:
                connection.close()
                if connection.reused and not connection.got_bytes:
                    continue  # a fresh connection next: _take skips closed ones, _connect makes one
                raise
            except BaseException:
                connection.close()  # cancelled: the client left before the answer began
                raise
            return connection

    def release(self, connection: Connection) -> None:
        """Keep ``connection`` for the next request if its answer was read to the end."""
        idle = self._idle.setdefault(connection.key, [])
        if connection.complete and connection.keep_alive and not connection.closed and len(idle) < MAX_IDLE_PER_TARGET:
            connection.reused = True
            connection.idle_since = time.monotonic()
            idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        """Close every idle connection (at shutdown)."""
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()

    def _take(self, key: tuple[str, int]) -> Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < IDLE_SECONDS:
                return connection
            connection.close()
        return None

    async def _connect(self, key: tuple[str, int]) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: Connection(key), key[0], key[1]), self._connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {key[0]}:{key[1]}: {exc or 'timed out'}") from None
        return connection
