"""Readiness: probe an instance's own ``/health`` until it first answers 200.

One small task per starting instance, sharing one HTTP client. Probes start fast (a preloaded
instance is healthy in about a second) and back off, so a slow start costs little.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

FIRST_DELAY = 0.05
MAX_DELAY = 0.25  # how late a ready instance may be seen: it shows in start_seconds
BACKOFF = 1.5
PROBE_TIMEOUT = 2.0


def probe_host(host: str | None) -> str:
    """Where to reach an instance that listens on ``host`` (``--host``) from this node."""
    if not host or host in ("0.0.0.0", "::", "[::]"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def wait_ready(
    client: httpx.AsyncClient,
    url: str,
    *,
    still_starting: Callable[[], bool],
    on_ready: Callable[[], None],
) -> None:
    """Probe ``url`` while ``still_starting()``; call ``on_ready`` at the first 200."""
    delay = FIRST_DELAY
    while still_starting():
        try:
            response = await client.get(url, timeout=PROBE_TIMEOUT)
            if response.status_code == 200:
                if still_starting():
                    on_ready()
                return
        except httpx.HTTPError:
            pass  # not listening yet, or busy loading
        await asyncio.sleep(delay)
        delay = min(delay * BACKOFF, MAX_DELAY)
