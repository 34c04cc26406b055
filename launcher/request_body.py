"""Reading request bodies, for the instance API and the front door alike (plain ASGI underneath)."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope

from launcher.errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def read_capped(scope: Scope, receive: Receive, cap: int) -> bytes | None:
    """The request body, or None as soon as it is (or is declared) larger than ``cap`` bytes.

    Raises :class:`starlette.requests.ClientDisconnect` if the client leaves before the end.
    """
    declared = _header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        return None
    first = await receive()
    if first["type"] == "http.request" and not first.get("more_body", False):  # the usual case: one piece
        body: bytes = first.get("body", b"")
        return body if len(body) <= cap else None
    message, parts, size = first, [], 0
    while True:
        if message["type"] != "http.request":
            raise ClientDisconnect()
        part = message.get("body", b"")
        size += len(part)
        if size > cap:
            return None
        parts.append(part)
        if not message.get("more_body", False):
            return b"".join(parts)
        message = await receive()


async def read_api_body(request: Request) -> bytes:
    """A ``/v2`` request body: JSON content types only (415), at most ``--max-body-bytes`` (413)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type and content_type != "application/json" and not content_type.endswith("+json"):
        raise UnsupportedMediaType(f"content type {content_type!r} is not supported: send application/json")
    cap = request.app.state.settings.max_body_bytes
    body = await read_capped(request.scope, request.receive, cap)
    if body is None:
        raise PayloadTooLarge(f"request body exceeds the {cap}-byte limit")
    return body


async def read_json_body(request: Request, what: str) -> dict[str, Any]:
    """A ``/v2`` request body as a JSON object (415, 413, 400 and 422 as for creates)."""
    return load_json_object(await read_api_body(request), what)


def load_json_object(body: bytes, what: str = "a JSON object with at least 'options'") -> dict[str, Any]:
    """A request body as a JSON object; 400 for empty or bad JSON, 422 for another JSON value."""
    if not body.strip():
        raise BadRequest(f"request body is empty: send {what}")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Unprocessable(f"request body must be {what}")
    return data
