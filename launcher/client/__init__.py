"""The launcher's Python client and ``launcherctl``: they depend on nothing of the server.

``from launcher.client import LauncherClient`` is the documented import path.
"""

from launcher.client.api_client import (
    ConflictError,
    EventStream,
    GoneError,
    InstanceState,
    InstanceStoppedError,
    LauncherAPIError,
    LauncherClient,
    LauncherClientError,
    LauncherConnectionError,
    NotFoundError,
    UnauthorizedError,
    WaitTimeoutError,
    WatchEvent,
    error_from_response,
    normalize_url,
)

__all__ = [
    "ConflictError",
    "EventStream",
    "GoneError",
    "InstanceState",
    "InstanceStoppedError",
    "LauncherAPIError",
    "LauncherClient",
    "LauncherClientError",
    "LauncherConnectionError",
    "NotFoundError",
    "UnauthorizedError",
    "WaitTimeoutError",
    "WatchEvent",
    "error_from_response",
    "normalize_url",
]
