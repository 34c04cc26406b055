"""The Starlette application: ``uvicorn launcher.app:app`` (settings from ``LAUNCHER_*``)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from launcher import logs
from launcher.api.auth import BearerTokenMiddleware, expected_header
from launcher.api.routes import routes
from launcher.api.ui_routes import ui_routes
from launcher.errors import LauncherError
from launcher.frontdoor.door import FrontDoor
from launcher.frontdoor.errors import OPENAI_PREFIX, openai_error
from launcher.frontdoor.live_config import LiveConfig
from launcher.frontdoor.models_store import ModelsStore
from launcher.frontdoor.profiles import ProfileError
from launcher.frontdoor.proxy import QUIET_ANSWER_CUT, AnswerCut
from launcher.frontdoor.routes import front_door_routes
from launcher.frontdoor.upstream import UpstreamPool
from launcher.hangup import on_hangup
from launcher.instances.manager import InstanceManager
from launcher.metrics import UpstreamConnections, metrics_endpoint
from launcher.settings import Settings, served_port, unknown_variables
from launcher.shutdown_signals import on_shutdown_signals

log = logging.getLogger("launcher")


async def _launcher_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LauncherError)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if exc.status_code == 404:
        detail = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
    if request.url.path.startswith(OPENAI_PREFIX):  # OpenAI's SDKs read errors in their own shape
        return openai_error(exc.status_code, detail, "NotFoundError" if exc.status_code == 404 else "BadRequestError",
                            "unknown_route", headers=exc.headers)  # fmt: skip
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, AnswerCut):  # expected: the proxy said it in one line (the answer is out already)
        return JSONResponse({"detail": str(exc)}, status_code=502)
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


async def _reload_quietly(live: LiveConfig) -> None:
    with contextlib.suppress(ProfileError):  # said, and shown in GET /v2/vllm/models
        await live.reload(why="SIGHUP")


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the app. Without ``settings``, they are read from the environment at start-up."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        resolved = settings if settings is not None else Settings.from_sources()
        logs.configure(resolved.log_level)
        if settings is None:  # uvicorn launcher.app:app: python -m launcher has said these already
            for warning in unknown_variables():
                log.warning("%s", warning)
            port = served_port(sys.argv)
            if port is not None and "LAUNCHER_PORT" not in os.environ:
                resolved = dataclasses.replace(resolved, port=port)  # its own default log directory
        store = ModelsStore(resolved.models_file)
        text = store.read_text() if store.kept else None
        models = store.load()  # a file that cannot be parsed stops the start, naming the line
        if store.kept and text is None:
            log.warning("the models file %s does not exist yet: it is created when a model is added "
                        "(PUT /v2/vllm/models/NAME)", store.path)  # fmt: skip
        app.state.authorization = expected_header(resolved)
        manager = InstanceManager(resolved)
        front_door = FrontDoor(manager, resolved, models)
        live = LiveConfig(front_door, store, text)
        app.state.settings = resolved
        app.state.manager = manager
        app.state.front_door = front_door
        app.state.live_config = live
        # The proxy's pooled keep-alive connections to instances: an instance silent for
        # --proxy-read-timeout in the middle of an answer ends that request (and frees its lease).
        app.state.upstream_pool = pool = UpstreamPool(connect_timeout=10.0, read_timeout=resolved.proxy_read_timeout)
        manager.metrics.registry.register(UpstreamConnections(pool))
        # An answer the instance broke off is cut on purpose, said in one line: no server traceback.
        logging.getLogger("uvicorn.error").addFilter(QUIET_ANSWER_CUT)
        manager.start()
        front_door.start()
        front_door.spawn(live.watch_forever(), "models-file-watch")

        def reload_now() -> None:
            front_door.spawn(_reload_quietly(live), "models-file-reload")

        async def stop_if_the_forkserver_gives_up() -> None:
            await manager.forkserver.gave_up.wait()  # it said why in one line
            manager.events.close()
            stop_server = getattr(app.state, "stop_server", None)  # python -m launcher's: it exits 2
            if stop_server is not None:
                stop_server()
            else:  # another ASGI server: stop as on SIGTERM (uvicorn re-raises it: a non-zero exit)
                os.kill(os.getpid(), signal.SIGTERM)

        giving_up = asyncio.create_task(stop_if_the_forkserver_gives_up(), name="forkserver-give-up")
        try:
            # Watch streams end as shutdown begins; SIGHUP reloads the models file.
            with on_shutdown_signals(manager.events.close), on_hangup(reload_now):
                yield
        finally:
            giving_up.cancel()
            await front_door.shutdown()
            app.state.upstream_pool.close()
            await manager.shutdown()

    app = Starlette(
        routes=[
            *front_door_routes(),  # first: a proxied request is matched after three routes, not thirty
            *routes(),
            *ui_routes(),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ],
        middleware=[Middleware(BearerTokenMiddleware)],
        lifespan=lifespan,
        exception_handlers={
            LauncherError: _launcher_error,
            HTTPException: _http_exception,
            Exception: _unexpected,
        },
    )
    # No 307 from /x/ to /x: a client following it from `DELETE /v2/vllm/instances/` would
    # delete every instance.
    app.router.redirect_slashes = False
    return app


app = create_app()
