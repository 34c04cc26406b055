"""``python -m launcher [--host H] [--port P] [--log-level L] ...``: run the API with uvicorn."""

from __future__ import annotations

import errno
import logging
import socket
import sys

import setproctitle
import uvicorn

from launcher import hangup
from launcher.app import create_app
from launcher.frontdoor.models_store import ModelsStore
from launcher.frontdoor.profiles import ProfileError
from launcher.instances import dir_lock, gpus
from launcher.instances.memory import parse_size
from launcher.settings import Settings, unknown_variables


def main(argv: list[str] | None = None) -> int:
    """Parse flags (over ``LAUNCHER_*`` variables) and serve until SIGTERM or Ctrl-C."""
    hangup.hold_early()
    for warning in unknown_variables():
        print(f"launcher: warning: {warning}", file=sys.stderr)
    settings = Settings.from_sources(sys.argv[1:] if argv is None else argv)
    setproctitle.setproctitle(f"vllm-launcher: api :{settings.port}")  # ps tells it from its forkserver
    setproctitle.setthreadtitle("vllm-launcher")  # comm (top, pgrep), 15 bytes at most
    listener: socket.socket | None = None
    try:  # checked before anything starts: one clear line each
        ModelsStore(settings.models_file).load()  # a file that cannot be parsed stops the start at once
        check_sizes(settings)
        # Bound now, before the forkserver preloads vLLM: a busy port fails in a moment, not in 15 s
        # (and before the log directory's lock, which a launcher on the same port also holds).
        listener = bind_api_socket(settings.host, settings.port)
        dir_lock.lock(settings.resolved_log_dir())  # held for the process's life (the app takes it again)
        if settings.mock_gpus and settings.gpu_map:
            gpus.configured_gpus(mock=True, count=settings.mock_gpu_count, gpu_map=settings.gpu_map,
                                 node_name=settings.node_name)  # fmt: skip
    except (ProfileError, gpus.GpuMapError, dir_lock.DirectoryInUse, PortInUse) as exc:
        if listener is not None:
            listener.close()
        print(f"launcher: {exc}", file=sys.stderr)
        return 2
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not (settings.api_token or settings.api_token_file):
        shown = f"[{settings.host}]" if ":" in settings.host else settings.host
        print(f"launcher: WARNING: the API listens on {shown}:{settings.port} with no token: anyone who can reach "
              "this port can start processes on this machine. Set a token (--api-token-file, LAUNCHER_API_TOKEN) "
              "or listen on loopback only (--host 127.0.0.1).", file=sys.stderr)  # fmt: skip
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,  # a line per proxied request costs the API more than the proxy does
        # Streaming responses must not hold up a shutdown for long.
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    app.state.stop_server = lambda: setattr(server, "should_exit", True)
    # uvicorn says where it listens only when it binds the socket itself.
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    logging.getLogger("uvicorn.error").info("Listening on http://%s:%d (Press CTRL+C to quit)", shown, settings.port)
    try:
        with listener:
            server.run(sockets=[listener])
    except KeyboardInterrupt:
        return 130  # uvicorn re-raises Ctrl-C after a clean shutdown: no traceback for that
    manager = getattr(app.state, "manager", None)
    if manager is not None and manager.forkserver.gave_up.is_set():
        return 2  # the forkserver could not start (the log's error line says why): a start-up error
    return 0


def check_sizes(settings: Settings) -> None:
    """``--memory-budget`` and ``--gpu-memory-reserve`` must be sizes; a ProfileError names the flag."""
    for flag, value in (
        ("--memory-budget", settings.memory_budget),
        ("--gpu-memory-reserve", settings.gpu_memory_reserve),
    ):
        try:
            parse_size(value)
        except ValueError as exc:
            raise ProfileError(f"{flag}: {exc}") from None


class PortInUse(OSError):
    """The API's address cannot be bound; the message says which and what to do."""


def bind_api_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, bound as uvicorn would bind it (it serves on this one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host.strip("[]"), port))
        listener.listen(2048)
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"port {port} on {host} is already in use: stop what holds it, or pick another with --port "
                "(LAUNCHER_PORT; `make run PORT=...`)"
            ) from None
        raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return listener


if __name__ == "__main__":
    sys.exit(main())
