"""An asyncio client for the forkserver's Unix socket (see :mod:`forkserver.protocol`)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from typing import Any

from forkserver import protocol


class ForkserverError(Exception):
    """The forkserver refused a request; ``kind`` says why (see protocol.KIND_*)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ForkserverGone(ForkserverError):
    """The connection to the forkserver is closed."""

    def __init__(self, message: str = "the forkserver is not connected") -> None:
        super().__init__(protocol.KIND_INTERNAL, message)


EventHandler = Callable[[dict[str, Any]], None]


class ForkserverClient:
    """One connection: requests get replies matched by id; events go to ``on_event``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, on_event: EventHandler) -> None:
        self._reader = reader
        self._writer = writer
        self._on_event = on_event
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader_task = asyncio.create_task(self._read_loop(), name="forkserver-reader")
        self.closed = asyncio.Event()

    @classmethod
    async def connect(cls, path: str, on_event: EventHandler) -> ForkserverClient:
        """Connect to the forkserver listening at ``path``."""
        reader, writer = await asyncio.open_unix_connection(path, limit=protocol.MAX_FRAME + 16)
        return cls(reader, writer, on_event)

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its reply; raise ForkserverError on ``ok: false``."""
        if self.closed.is_set():
            raise ForkserverGone()
        request_id = next(self._ids)
        try:
            frame = protocol.encode({"op": op, "id": request_id, **fields})
        except protocol.FrameError as exc:  # options and env vars of a size no instance needs
            raise ForkserverError(protocol.KIND_INVALID, f"the request is too large for the forkserver: {exc}") from None
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            self._writer.write(frame)
            await self._writer.drain()
            reply = await future
        except (ConnectionError, OSError) as exc:
            raise ForkserverGone(f"lost the forkserver: {exc}") from None
        finally:
            self._waiting.pop(request_id, None)
        if not reply.get("ok"):
            raise ForkserverError(str(reply.get("kind", protocol.KIND_INTERNAL)), str(reply.get("error")))
        return reply

    async def _read_loop(self) -> None:
        try:
            while True:
                header = await self._reader.readexactly(protocol.HEADER.size)
                body = await self._reader.readexactly(protocol.frame_length(header))
                message = protocol.decode_body(body)
                request_id = message.get("id")
                future = self._waiting.get(request_id) if isinstance(request_id, int) else None
                if future is not None and not future.done():
                    future.set_result(message)
                elif "event" in message:
                    self._on_event(message)
        except (asyncio.IncompleteReadError, ConnectionError, protocol.FrameError, OSError):
            pass
        finally:
            self.closed.set()
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ForkserverGone())

    async def close(self) -> None:
        """Close the connection (the forkserver keeps running)."""
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        self.closed.set()
