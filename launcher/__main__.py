"""``python -m launcher [--host H] [--port P] [--log-level L] ...``: run the API with uvicorn."""

from __future__ import annotations

import sys

import uvicorn

from launcher.app import create_app
from launcher.settings import Settings


def main(argv: list[str] | None = None) -> int:
    """Parse flags (over ``LAUNCHER_*`` variables) and serve until SIGTERM or Ctrl-C."""
    settings = Settings.from_sources(sys.argv[1:] if argv is None else argv)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Streaming responses (log follows, watches) must not hold up a shutdown for long.
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
