"""The dashboard: ``GET /ui`` and its two static files, served from the package (no build step).

The page itself holds no data and needs no token; it asks for one when the API answers 401
and keeps it in the tab's session storage.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Route

from launcher.errors import NotFound

UI_DIR = Path(__file__).resolve().parent / "ui"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
NO_CACHE = {"Cache-Control": "no-cache"}  # a new launcher version is picked up on reload


async def page(request: Request) -> FileResponse:
    """``GET /ui``: the dashboard."""
    return FileResponse(UI_DIR / "index.html", media_type="text/html; charset=utf-8", headers=NO_CACHE)


async def asset(request: Request) -> FileResponse:
    """``GET /ui/{asset}``: the page's script and style sheet."""
    name = request.path_params["asset"]
    if name not in ASSETS:
        raise NotFound(f"no such dashboard file: {name[:100]!r}")
    return FileResponse(UI_DIR / name, media_type=ASSETS[name], headers=NO_CACHE)


def wants_html(accept: str) -> bool:
    """True for a browser's ``Accept`` (it asks for text/html first); API clients get JSON."""
    return "text/html" in accept.lower()


def accept_of(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """Every ``Accept`` header of raw ASGI headers, as one (RFC 9110 5.3: repeated fields join with commas).

    The one reading of ``Accept`` for the token check and the index alike: a request cannot be
    a browser to one and an API client to the other.
    """
    return ", ".join(value.decode("latin-1") for name, value in headers if name.lower() == b"accept")


def ui_routes() -> list[Route]:
    """The dashboard's routes, for the app."""
    return [Route("/ui", page, methods=["GET"]), Route("/ui/{asset}", asset, methods=["GET"])]
