"""The front door's upstream pool built on a maintained client (aiohttp), to measure against ours.

``launcher/frontdoor/upstream.py`` is hand-written (httptools, asyncio protocols). This module
gives the proxy the same interface over aiohttp's ``ClientSession`` and ``TCPConnector`` (its
C parser, its keep-alive pool, no retry of a POST), so that `make bench-front-door` can run both
in one session, ABBA. It is a benchmark's variant, never what the launcher runs:

    .venv/bin/python -m benchmarks.upstream_alternatives --port 8001 ...   # python -m launcher, aiohttp's pool
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import aiohttp

from launcher.frontdoor import upstream
from launcher.frontdoor.upstream import UpstreamError, UpstreamTimeout

# The proxy's head is built for a raw socket; aiohttp builds its own from these parts.
_SKIPPED = frozenset({"host", "content-length"})


def _parse_head(head: bytes) -> tuple[str, str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            if name.lower() not in _SKIPPED:
                headers.append((name, value.strip()))
    return method, target, headers


class AiohttpConnection:
    """One request's answer, as the proxy reads it (``status``, ``headers``, ``read()``...)."""

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.closed = False
        self.keep_alive = True
        self.response: aiohttp.ClientResponse | None = None
        self.task: asyncio.Task[Any] | None = None

    async def read(self) -> bytes | None:
        """The body that has arrived since the last call; None at its end."""
        assert self.response is not None
        try:
            data = await self.response.content.readany()
        except TimeoutError:
            raise UpstreamTimeout("the instance sent nothing for the read timeout") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamError(f"the instance closed the connection: {exc}") from None
        if not data:
            self.complete = True
            return None
        return data

    def close(self) -> None:
        """Abort the request (the client left)."""
        self.closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.response is not None:
            self.response.close()


class AiohttpPool:
    """The interface of :class:`launcher.frontdoor.upstream.UpstreamPool`, over aiohttp."""

    def __init__(self, *, connect_timeout: float, read_timeout: float) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._session: aiohttp.ClientSession | None = None
        self.opened = 0  # not counted by aiohttp per request: left at 0
        self.reused = 0

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=upstream.IDLE_SECONDS)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout,
                                            sock_read=self._read_timeout or None)  # fmt: skip
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                                  skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept",
                                                                     "Content-Type"))  # fmt: skip
        return self._session

    async def request(
        self,
        host: str,
        port: int,
        head: bytes,
        body: bytes,
        *,
        on_connection: Callable[[Any], None],
        max_idle: float = upstream.IDLE_SECONDS,  # aiohttp's connector has one keep-alive for all
    ) -> AiohttpConnection:
        method, target, headers = _parse_head(head)
        connection = AiohttpConnection((host, port))
        on_connection(connection)
        if connection.closed:
            raise UpstreamError("the request was given up", request_sent=False)
        url = f"http://{host}:{port}{target}"
        connection.task = asyncio.ensure_future(self._client().request(method, url, data=body, headers=headers))
        try:
            response = await connection.task
        except asyncio.CancelledError:
            if connection.closed:
                raise UpstreamError("the request was given up") from None
            raise
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc}", request_sent=False) from None
        except TimeoutError:
            raise UpstreamTimeout("the instance sent nothing for the read timeout") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(str(exc)) from None
        connection.response = response
        connection.status = response.status
        connection.headers = list(response.raw_headers)
        return connection

    def release(self, connection: Any) -> None:
        if connection.response is not None:
            if connection.complete:
                connection.response.release()
            else:
                connection.response.close()

    def idle_connections(self) -> dict[tuple[str, int], int]:
        return {}

    def close(self) -> None:
        if self._session is not None:
            asyncio.ensure_future(self._session.close())


def main() -> int:
    """``python -m launcher``, its proxy on aiohttp's pool."""
    import launcher.app as app_module
    from launcher.__main__ import main as launcher_main

    setattr(app_module, "UpstreamPool", AiohttpPool)  # noqa: B010 - the one name create_app looks up
    return launcher_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
