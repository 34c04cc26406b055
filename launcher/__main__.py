"""``python -m launcher [--host H] [--port P] [--log-level L] ...``: run the API with uvicorn."""

from __future__ import annotations

import sys

import uvicorn

from launcher import dir_lock, gpus
from launcher.app import create_app
from launcher.profiles import ProfileError, load_models_file
from launcher.settings import Settings


def main(argv: list[str] | None = None) -> int:
    """Parse flags (over ``LAUNCHER_*`` variables) and serve until SIGTERM or Ctrl-C."""
    settings = Settings.from_sources(sys.argv[1:] if argv is None else argv)
    try:  # checked before anything starts: one clear line each
        load_models_file(settings.models_file)
        dir_lock.lock(settings.resolved_log_dir())  # held for the process's life (the app takes it again)
        if settings.mock_gpus and settings.gpu_map:
            gpus.configured_gpus(mock=True, count=settings.mock_gpu_count, gpu_map=settings.gpu_map,
                                 node_name=settings.node_name)  # fmt: skip
    except (ProfileError, gpus.GpuMapError, dir_lock.DirectoryInUse) as exc:
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
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        return 130  # uvicorn re-raises Ctrl-C after a clean shutdown: no traceback for that
    return 0


if __name__ == "__main__":
    sys.exit(main())
