"""The front door's upstream client against real TCP servers on loopback (no mocks).

Keep-alive reuse, a request never sent twice, pooled connections dropped when the server closes
them or they near its keep-alive timeout, nothing kept for servers that are gone, answers framed by length, by chunks and by the connection's end, back-pressure, the
read timeout, and servers that do not speak HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from launcher.frontdoor import upstream
from launcher.frontdoor.upstream import HIGH_WATER, Connection, UpstreamError, UpstreamPool, UpstreamTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEAD = b"POST /v1/x HTTP/1.1\r\nhost: test\r\ncontent-length: 2\r\n\r\n"


class Server:
    """A loopback TCP server running ``handler`` per connection, counting connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self.writers.append(writer)
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()

    def close_clients(self) -> None:
        """Close every connection (as an instance that exits does)."""
        for writer in self.writers:
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return await reader.readexactly(length)


def answer(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body


async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        body = await read_request(reader)
        writer.write(answer(b"echo " + body))
        await writer.drain()


async def body_of(pool: UpstreamPool, port: int, body: bytes = b"hi") -> tuple[Connection, bytes]:
    connection = await pool.request("127.0.0.1", port, HEAD, body, on_connection=lambda _: None)
    parts = []
    while (data := await connection.read()) is not None:
        parts.append(data)
    return connection, b"".join(parts)


def run(coroutine: Awaitable[None]) -> None:
    asyncio.run(coroutine)  # type: ignore[arg-type]


def test_sequential_requests_share_one_kept_alive_connection() -> None:
    async def scenario() -> None:
        pool = UpstreamPool(connect_timeout=5, read_timeout=0)
        async with Server(keep_answering) as server:
            for _ in range(5):
                connection, body = await body_of(pool, server.port)
                assert (connection.status, body) == (200, b"echo hi")
                pool.release(connection)
            assert server.connections == 1
        pool.close()

    run(scenario())


def test_a_connection_the_server_closes_is_not_reused() -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"bye", b"connection: close\r\n"))
        await writer.drain()

    async def scenario() -> None:
        pool = UpstreamPool(connect_timeout=5, read_timeout=0)
        async with Server(once) as server:
            for _ in range(3):
                connection, body = await body_of(pool, server.port)
                assert body == b"bye" and not connection.keep_alive
                pool.release(connection)
            assert server.connections == 3
        pool.close()

    run(scenario())


class Counting:
    """A handler that answers its first request on each connection and counts every request it reads."""

    def __init__(self, then: str) -> None:
        self.then = then  # what a connection's second request gets: "close" (no answer), or "silence"
        self.requests = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        self.requests += 1
        writer.write(answer(b"first"))
        await writer.drain()
        await read_request(reader)  # it got the request, and may be generating already
        self.requests += 1
        if self.then == "silence":
            await asyncio.sleep(10)


@pytest.mark.parametrize("then", ["close", "silence"])
def test_a_request_is_never_sent_twice(then: str) -> None:
    """A POST the instance may have seen is not sent again, on any connection (it is not idempotent)."""

    async def scenario() -> None:
        pool = UpstreamPool(connect_timeout=5, read_timeout=0.3)
        handler = Counting(then)
        async with Server(handler) as server:
            connection, body = await body_of(pool, server.port)
            assert body == b"first"
            pool.release(connection)
            with pytest.raises(UpstreamError):
                await body_of(pool, server.port)
            await asyncio.sleep(0.1)
            assert handler.requests == 2 and server.connections == 1
        pool.close()

    run(scenario())


def test_a_connection_the_instance_closes_while_idle_is_dropped_at_once() -> None:
    async def answers_then_closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"once"))
        await writer.drain()
        await asyncio.sleep(0.05)  # its keep-alive ends (vLLM's uvicorn: 5 s)

    async def scenario() -> None:
        pool = UpstreamPool(connect_timeout=5, read_timeout=0)
        async with Server(answers_then_closes) as server:
            connection, body = await body_of(pool, server.port)
            pool.release(connection)
            assert pool.idle_connections() == {("127.0.0.1", server.port): 1}
            await asyncio.sleep(0.2)
            assert pool.idle_connections() == {}  # seen closing: nothing is kept for it
            second, body = await body_of(pool, server.port)
            assert body == b"once" and second is not connection and server.connections == 2
        pool.close()

    run(scenario())


def test_a_connection_idle_near_the_instances_keepalive_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "IDLE_SECONDS", 0.2)

    async def scenario() -> None:
        pool = UpstreamPool(connect_timeout=5, read_timeout=0)
        async with Server(keep_answering) as server:
            connection, _ = await body_of(pool, server.port)
            pool.release(connection)
            again, _ = await body_of(pool, server.port)
            assert again is connection and (pool.opened, pool.reused) == (1, 1)
            pool.release(again)
            await asyncio.sleep(0.3)
            assert pool.idle_connections() == {} and connection.closed  # pruned, not left to the instance
            third, _ = await body_of(pool, server.port)
            assert third is not connection and server.connections == 2
        pool.close()

    run(scenario())


def test_nothing_is_kept_for_instances_that_are_gone() -> None:
    async def scenario() -> None:
        pool = UpstreamPool(connect_timeout=5, read_timeout=0)
        for _ in range(30):  # an instance lifetime each: a new port every time
            async with Server(keep_answering) as server:
                for _ in range(3):
                    connection, _ = await body_of(pool, server.port)
                    pool.release(connection)
                server.close_clients()
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert pool.idle_connections() == {}
        pool.close()

    run(scenario())


def test_chunked_and_close_framed_answers_arrive_whole() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n")
        for number in range(5):
            event = f"data: {number}\n\n".encode()
            writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        await writer.drain()

    async def scenario() -> None:
        pool = UpstreamPool(connect_timeout=5, read_timeout=0)
        async with Server(chunked) as server:
            connection, body = await body_of(pool, server.port)
            assert body == b"".join(f"data: {n}\n\n".encode() for n in range(5))
            assert (b"content-type", b"text/event-stream") in connection.headers
            pool.release(connection)
        async with Server(until_close) as server:
            connection, body = await body_of(pool, server.port)
            assert body == b"all of it" and connection.complete
        pool.close()

    run(scenario())


def flooding(size: int) -> Handler:
    """A server answering ``size`` bytes as fast as its client takes them."""

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: " + str(size).encode() + b"\r\n\r\n")
        for _ in range(size // 65536):
            writer.write(b"x" * 65536)
            await writer.drain()

    return flood


def test_a_slow_reader_pauses_the_instance_and_loses_nothing() -> None:
    size = 4 * HIGH_WATER

    flood = flooding(size)

    async def scenario() -> None:
        pool = UpstreamPool(connect_timeout=5, read_timeout=0)
        async with Server(flood) as server:
            connection = await pool.request("127.0.0.1", server.port, HEAD, b"hi", on_connection=lambda _: None)
            received, paused = 0, False
            while (data := await connection.read()) is not None:
                received += len(data)
                await asyncio.sleep(0.02)  # a slow client
                paused = paused or connection._paused  # noqa: SLF001 - the back-pressure under test
                assert len(data) <= HIGH_WATER + 65536 * 4  # buffered at most about the high-water mark
            assert received == size
            assert paused  # reading paused while the client was behind
        pool.close()

    run(scenario())


def test_time_paused_for_a_slow_reader_is_not_silence() -> None:
    """Back-pressure pauses reading from the instance; the read timeout counts only real silence."""
    size = 4 * HIGH_WATER

    flood = flooding(size)

    async def scenario() -> None:
        pool = UpstreamPool(connect_timeout=5, read_timeout=0.2)
        async with Server(flood) as server:
            connection = await pool.request("127.0.0.1", server.port, HEAD, b"hi", on_connection=lambda _: None)
            received = 0
            while (data := await connection.read()) is not None:
                received += len(data)
                await asyncio.sleep(0.3)  # slower than the read timeout, between reads
            assert received == size
        pool.close()

    run(scenario())


def test_an_instance_silent_past_the_read_timeout_fails_the_answer() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(10)

    async def scenario() -> None:
        pool = UpstreamPool(connect_timeout=5, read_timeout=0.3)
        async with Server(stall) as server:
            connection = await pool.request("127.0.0.1", server.port, HEAD, b"hi", on_connection=lambda _: None)
            assert await connection.read() == b"hello"
            with pytest.raises(UpstreamTimeout, match="sent nothing for 0.3s"):
                await connection.read()
            assert connection.closed
        pool.close()

    run(scenario())


def test_what_is_not_http_or_not_there_is_an_upstream_error() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def scenario() -> None:
        pool = UpstreamPool(connect_timeout=5, read_timeout=0)
        async with Server(garbage) as server:
            with pytest.raises(UpstreamError, match="not valid HTTP"):
                await pool.request("127.0.0.1", server.port, HEAD, b"hi", on_connection=lambda _: None)
            port = server.port
        await asyncio.sleep(0.05)
        with pytest.raises(UpstreamError, match="cannot connect"):
            await pool.request("127.0.0.1", port, HEAD, b"hi", on_connection=lambda _: None)
        pool.close()

    run(scenario())
