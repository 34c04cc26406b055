"""Optional bearer-token access control (settings ``api_token`` or ``api_token_file``).

When a token is set, every endpoint but ``GET /health`` needs ``Authorization: Bearer <token>``;
anything else is a 401. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from launcher.api.ui_routes import accept_of, wants_html
from launcher.settings import Settings

OPEN_PATHS = frozenset({"/health", "/ui"})  # and the dashboard's files under /ui/: no data in them


def expected_header(settings: Settings) -> bytes | None:
    """The ``Authorization`` value requests must carry, or None when no token is configured."""
    token = load_token(settings)
    return f"Bearer {token}".encode() if token else None


def load_token(settings: Settings) -> str | None:
    """The configured token (the file wins over the plain setting), or None when there is none."""
    if settings.api_token_file:
        token = Path(settings.api_token_file).read_text().strip()
        if not token:
            raise SystemExit(f"the token file {settings.api_token_file} is empty")
        return token
    return settings.api_token or None


def _is_open(scope: Scope) -> bool:
    path: str = scope["path"]
    return path in OPEN_PATHS or path.startswith("/ui/")


async def _to_dashboard(send: Send) -> None:
    """A browser asking for ``/`` is sent to the dashboard (which asks for the token), by this
    middleware itself: ``/`` is never passed on without the token."""
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", b"/ui"), (b"content-length", b"0")]})  # fmt: skip
    await send({"type": "http.response.body", "body": b""})


class BearerTokenMiddleware:
    """Pure ASGI middleware: no buffering, so streaming responses stay streaming.

    The expected header is read from ``app.state.authorization`` (set at start-up from the
    settings), so the module-level app of ``uvicorn launcher.app:app`` needs no settings at import.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        expected: bytes | None = getattr(scope["app"].state, "authorization", None) if "app" in scope else None
        if scope["type"] != "http" or _is_open(scope):
            await self.app(scope, receive, send)
            return
        if expected is None and "app" in scope and not hasattr(scope["app"].state, "authorization"):
            expected = b"\0"  # not started yet: refuse rather than serve unauthenticated
        if expected is None:
            await self.app(scope, receive, send)
            return
        given = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(given) == 1 and hmac.compare_digest(given[0], expected):  # two are ambiguous: refused
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/" and wants_html(accept_of(scope["headers"])):
            await _to_dashboard(send)
            return
        message = "missing or wrong bearer token: send 'Authorization: Bearer <token>'"
        if scope["path"].startswith("/v1/") or scope["path"] == "/v1":  # OpenAI's SDKs read their own shape
            body = json.dumps({"error": {"message": message + " (the OpenAI SDKs send their api_key so)",
                                         "type": "AuthenticationError", "code": "invalid_api_key"}}).encode()  # fmt: skip
        else:
            body = json.dumps({"detail": message}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="vllm-launcher"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
