"""``python -m launcher [--host H] [--port P] [--log-level L] ...``: run the API with uvicorn."""

from __future__ import annotations

import asyncio
import sys
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from launcher.app import create_app
from launcher.profiles import ProfileError, load_models_file
from launcher.settings import Settings


def main(argv: list[str] | None = None) -> int:
    """Parse flags (over ``LAUNCHER_*`` variables) and serve until SIGTERM or Ctrl-C."""
    settings = Settings.from_sources(sys.argv[1:] if argv is None else argv)
    try:
        load_models_file(settings.models_file)  # checked before anything starts: one clear line
    except ProfileError as exc:
        print(f"launcher: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Streaming responses must not hold up a shutdown for long.
        timeout_graceful_shutdown=5,
    )
    try:
        LauncherServer(config, app).run()
    except KeyboardInterrupt:
        return 130  # uvicorn re-raises Ctrl-C after a clean shutdown: no traceback for that
    return 0


class LauncherServer(uvicorn.Server):
    """uvicorn, ending open watch streams as soon as shutdown begins.

    uvicorn waits for open responses before it runs the lifespan shutdown; a watch stream
    never ends by itself, so without this a SIGTERM would wait for the graceful timeout.
    """

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        manager = getattr(self._app.state, "manager", None)
        if manager is not None:
            try:
                # A signal handler may run in the middle of the loop's own work: schedule, don't call.
                asyncio.get_running_loop().call_soon_threadsafe(manager.events.close)
            except RuntimeError:
                manager.events.close()  # no loop running: nothing to interrupt
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    sys.exit(main())
