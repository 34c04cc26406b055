"""HTTP endpoints. Each handler is thin: parse the request, call the manager, shape the answer."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from launcher import __version__
from launcher.api import log_range
from launcher.api.ui_routes import accept_of, wants_html
from launcher.errors import BadRequest, LauncherError, RangeNotSatisfiable, Unprocessable
from launcher.errors import Gone as GoneError
from launcher.instances import events
from launcher.instances.config import VllmConfig, check_instance_id, did_you_mean, parse_config
from launcher.instances.manager import InstanceManager
from launcher.instances.state import Status
from launcher.request_body import read_api_body

log = logging.getLogger("launcher.api.routes")

ENDPOINTS = {
    "index": "GET /",
    "health": "GET /health",
    "create_instance": "POST /v2/vllm/instances",
    "create_named_instance": "PUT /v2/vllm/instances/{instance_id}",
    "delete_instance": "DELETE /v2/vllm/instances/{instance_id}",
    "delete_all_instances": "DELETE /v2/vllm/instances",
    "get_instance_status": "GET /v2/vllm/instances/{instance_id}",
    "get_all_instances": "GET /v2/vllm/instances",
    "get_instance_logs": "GET /v2/vllm/instances/{instance_id}/log",
    "watch_instances": "GET /v2/vllm/instances/watch?since=REVISION",
    "list_gpus": "GET /v2/vllm/gpus",
    "openapi": "GET /openapi.json",
    "openai_models": "GET /v1/models",
    "openai_request": "POST /v1/... (routed by the body's model; started on first request)",
    "list_model_profiles": "GET /v2/vllm/models",
    "model_profile": "GET|PUT|DELETE /v2/vllm/models/{name}",
    "model_start_stop": "POST /v2/vllm/models/{name}/start, POST /v2/vllm/models/{name}/stop",
    "model_failed_log": "GET /v2/vllm/models/{name}/log (the end of its last failed start's log)",
    "reload_models_file": "POST /v2/vllm/models/reload (the models file is also reloaded when it changes)",
    "dashboard": "GET /ui (browsers asking for / are sent there)",
}


def _manager(request: Request) -> InstanceManager:
    manager: InstanceManager = request.app.state.manager
    return manager


async def index(request: Request) -> Response:
    """Service name, version and endpoints; a browser is sent to the dashboard instead."""
    if wants_html(accept_of(request.scope["headers"])):
        return RedirectResponse("/ui", status_code=303)
    return JSONResponse({"name": "Multi-Instance vLLM Management API", "version": __version__, "endpoints": ENDPOINTS})


async def health(request: Request) -> JSONResponse:
    """200 ``{"status": "OK"}`` while instances can be created; 503 while the forkserver is down."""
    forkserver = _manager(request).forkserver
    if forkserver.ready:
        return JSONResponse({"status": "OK"})
    detail = forkserver.last_error or "the forkserver is starting (preloading vLLM)"
    return JSONResponse({"status": "unavailable", "detail": detail}, status_code=503)


async def _create(request: Request, instance_id: str | None) -> JSONResponse:
    received_at = time.time()
    manager = _manager(request)
    try:
        if instance_id is not None:
            check_instance_id(instance_id)
        settings = request.app.state.settings
        raw = await read_api_body(request)
        config, ignored = parse_config(raw, strict=settings.strict_fields, empty_options=settings.fma_compat)
    except LauncherError:
        manager.metrics.create_failures.labels(reason="invalid").inc()
        raise
    record = await manager.create(config, instance_id, received_at=received_at)
    body = {
        "status": "started",
        "instance_id": record.instance_id,
        "pid": record.pid,
        "port": record.port,
        "model": record.model,
        **record.config.echo(),  # options, gpu_uuids, env_vars, annotations (those given), as FMA's launcher
        "revision": record.revision,
    }
    headers = {}
    if ignored:  # in the body too: plain curl never shows the header, and a typo'd env_vars is silent otherwise
        body["ignored_fields"] = ignored
    notes = _create_warnings(config, record.config, ignored)
    if notes:
        body["warning"] = "; ".join(sentence for sentence, _ in notes)
        headers["Warning"] = _warning_header("; ".join(short for _, short in notes))
        log.warning("create %s: %s", record.instance_id, body["warning"][:500])
    return JSONResponse(body, status_code=201, headers=headers)


def ignored_fields_sentence(ignored: list[str]) -> str:
    """``unknown fields ignored: env_var (did you mean 'env_vars'?)``: the fields, with the likely one."""
    return "unknown fields ignored: " + ", ".join(
        name + did_you_mean(name, VllmConfig.model_fields) for name in ignored
    )


def _create_warnings(given: VllmConfig, made: VllmConfig, ignored: list[str]) -> list[tuple[str, str]]:
    """What a create's answer warns of, each as (the body's sentence, the header's shorter one): an
    ``env_vars.CUDA_VISIBLE_DEVICES`` replaced by what ``gpu_uuids`` mean, unknown fields ignored."""
    notes = []
    asked = (given.env_vars or {}).get("CUDA_VISIBLE_DEVICES")
    used = (made.env_vars or {}).get("CUDA_VISIBLE_DEVICES")
    if given.gpu_uuids is not None and asked is not None and asked != used:
        replaced = f"env_vars.CUDA_VISIBLE_DEVICES={asked[:100]!r} replaced by {used!r}, what gpu_uuids mean"
        notes.append((replaced, replaced))
    if ignored:
        notes.append((ignored_fields_sentence(ignored), "unknown fields ignored: " + ", ".join(ignored)))
    return notes


def _warning_header(sentence: str) -> str:
    """An RFC 7234 ``Warning: 299`` value carrying ``sentence``."""
    text = re.sub(r'[^\x20-\x7e]|["\\]', "?", sentence[:500])  # printable, no quote-breaking
    return f'299 - "{text}"'


async def create_instance(request: Request) -> JSONResponse:
    """POST: create an instance with a generated UUID."""
    return await _create(request, None)


async def create_named_instance(request: Request) -> JSONResponse:
    """PUT: create an instance with the id in the path (409 if it exists)."""
    return await _create(request, request.path_params["instance_id"])


async def get_instance(request: Request) -> JSONResponse:
    """One instance's state (404 if unknown)."""
    return JSONResponse(_manager(request).get(request.path_params["instance_id"]).to_json())


# The words pydantic reads as booleans (FMA's launcher parses ``detail`` with pydantic).
_TRUE_WORDS = frozenset({"true", "1", "yes", "on", "t", "y"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off", "f", "n"})


def _parse_detail(value: str | None, *, fma: bool) -> bool:
    if value is None:
        return True
    word = value.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    message = f"invalid detail={value[:50]!r}: use True or False"
    raise (Unprocessable(message) if fma else BadRequest(message))


async def list_instances(request: Request) -> JSONResponse:
    """All instances: ids only with ``detail=False``, full states otherwise.

    Under ``--fma-compat`` a 503 until instances can be created: FMA's pods probe this path for
    readiness, and FMA's launcher opens its port only once it can fork.
    """
    if request.app.state.settings.fma_compat and not _manager(request).forkserver.ready:
        return await health(request)
    detail = _parse_detail(request.query_params.get("detail"), fma=request.app.state.settings.fma_compat)
    records = _manager(request).all()
    revision = _manager(request).events.revision
    if not detail:
        ids = [record.instance_id for record in records]
        return JSONResponse({"instance_ids": ids, "count": len(ids), "revision": revision})
    return JSONResponse(
        {
            "total_instances": len(records),
            "running_instances": sum(record.status is Status.RUNNING for record in records),
            "instances": [record.to_json() for record in records],
            "revision": revision,
        }
    )


async def delete_instance(request: Request) -> JSONResponse:
    """Stop and delete one instance; answers once no process of it is left."""
    return JSONResponse(await _manager(request).delete(request.path_params["instance_id"]))


async def delete_all_instances(request: Request) -> JSONResponse:
    """Stop and delete every instance."""
    stopped = await _manager(request).delete_all()
    return JSONResponse({"status": "all_stopped", "stopped_instances": stopped, "total_stopped": len(stopped)})


async def get_instance_log(request: Request) -> Response:
    """Raw log bytes, honouring the ``Range`` rules of :mod:`launcher.api.log_range`."""
    record = _manager(request).get(request.path_params["instance_id"])
    header = request.headers.get("range")
    byte_range = log_range.parse_range(header) if header is not None else None
    try:
        piece = await asyncio.to_thread(log_range.read_log, record.log_path, byte_range)
    except RangeNotSatisfiable as exc:
        return Response(b"", status_code=416, headers=exc.headers)  # empty body, as RFC 9110 has it
    if byte_range is None and piece.total == 0 and request.app.state.settings.fma_compat:
        # FMA's launcher: an empty log is a range that cannot be satisfied, even unasked.
        return Response(b"", status_code=416, headers={"Content-Range": "bytes */0"})
    _manager(request).metrics.log_bytes.inc(len(piece.data))
    headers = {"Accept-Ranges": "bytes"}
    if piece.data:
        headers["Content-Range"] = piece.content_range  # a 200 too, as FMA's launcher: where the bytes sit
    status = 200 if byte_range is None else 206
    return Response(piece.data, status_code=status, media_type="application/octet-stream", headers=headers)


def _parse_since(value: str | None) -> int | None:
    if value is None:
        return None
    digits = value.strip()
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 18):
        raise BadRequest(f"invalid since={value[:50]!r}: use a revision number (0 or more)")
    return int(value)


async def watch_instances(request: Request) -> StreamingResponse:
    """NDJSON events; without ``since`` it starts with a CREATED for each existing instance."""
    manager = _manager(request)
    since = _parse_since(request.query_params.get("since"))
    if since is not None and since > manager.events.revision and not request.app.state.settings.fma_compat:
        # FMA's launcher waits for such a revision instead; here it is most likely one from before a restart.
        raise BadRequest(f"since={since} is in the future: the current revision is {manager.events.revision}")
    # Snapshot and subscription happen with no await between: no event is missed or doubled.
    watcher = manager.events.watch()
    if since is None:
        backlog = [{"type": events.CREATED, "object": record.to_json()} for record in manager.all()]
    else:
        try:
            backlog = [event.to_json() for event in manager.events.since(since)]
        except events.Gone as exc:
            manager.events.unwatch(watcher)
            raise GoneError(str(exc)) from None
    stream = _stream(manager.events, watcher, backlog, max(since or 0, manager.events.revision))
    return StreamingResponse(stream, media_type="application/x-ndjson", headers={"X-Content-Type-Options": "nosniff"})


async def _stream(log: events.EventLog, watcher: events.Watcher, backlog: list[dict[str, Any]], last: int) -> Any:
    try:
        for item in backlog:
            yield json.dumps(item) + "\n"
        while True:
            event = await watcher.queue.get()
            if event is None:
                if watcher.dropped:
                    # Like a Kubernetes watch: say why the stream ends and where to resume.
                    detail = f"watcher fell behind; resume with since={last}"
                    yield json.dumps({"type": "ERROR", "object": {"detail": detail, "revision": last}}) + "\n"
                return
            if event.revision > last:
                last = event.revision
                yield json.dumps(event.to_json()) + "\n"
    finally:
        log.unwatch(watcher)


async def list_gpus(request: Request) -> JSONResponse:
    """The node's GPUs (NVML, or the mock set) and the live instances using each."""
    manager = _manager(request)
    table = manager.gpu_table()
    return JSONResponse({"gpus": table, "count": len(table), "mock": request.app.state.settings.mock_gpus})


async def openapi(request: Request) -> JSONResponse:
    """This API's OpenAPI 3.1 document (built from the pydantic models in launcher.api.schemas)."""
    from launcher.api.openapi import openapi_document

    return JSONResponse(openapi_document())


def routes() -> list[Route]:
    """The API's routes."""
    instance = "/v2/vllm/instances/{instance_id}"
    return [
        Route("/", index, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v2/vllm/instances", create_instance, methods=["POST"]),
        Route("/v2/vllm/instances", list_instances, methods=["GET"]),
        Route("/v2/vllm/instances", delete_all_instances, methods=["DELETE"]),
        Route("/v2/vllm/instances/watch", watch_instances, methods=["GET"]),
        Route("/v2/vllm/gpus", list_gpus, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route(instance, create_named_instance, methods=["PUT"]),
        Route(instance, get_instance, methods=["GET"]),
        Route(instance, delete_instance, methods=["DELETE"]),
        Route(instance + "/log", get_instance_log, methods=["GET"]),
    ]
