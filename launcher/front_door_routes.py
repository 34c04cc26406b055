"""The front door's HTTP side: OpenAI-compatible ``/v1`` routing and ``/v2/vllm/models``.

``POST /v1/...`` reads ``"model"`` from the JSON body, holds that model's instance (starting
it first if needed) and passes the request through with httpx's streaming client: status,
headers and body come back as vLLM sends them, chunk by chunk. ``/v1`` errors use OpenAI's
shape ``{"error": {"message", "type", "code"}}``; ``/v2/vllm/models`` errors the launcher's
``{"detail"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

import httpx
from pydantic import ValidationError
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from launcher import readiness
from launcher.errors import BadRequest, Conflict, NotFound, ServiceUnavailable, Unprocessable
from launcher.front_door import FrontDoor, Lease, ModelState, NoRoom, StartFailed
from launcher.profiles import ModelProfile, ProfileError, check_name, plain_errors
from launcher.routes import read_capped, read_json_body

# Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy sets itself; everything else passes.
_REQUEST_HEADERS_DROPPED = frozenset(
    {"host", "content-length", "authorization", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
     "proxy-authorization", "proxy-connection", "expect"}
)  # fmt: skip
_RESPONSE_HEADERS_DROPPED = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection", "date", "server"}
)
log = logging.getLogger("launcher.front_door")
T = TypeVar("T")
OPENAI_PREFIX = "/v1/"  # the front door's paths: errors here are OpenAI-shaped
UNKNOWN_MODEL_LABEL = "(unknown)"  # the metrics label for names no profile has
RETRY_AFTER_SECONDS = "5"


class _AnyPath(Convertor[str]):
    """Like ``path``, newlines too: any name reaches the handler, which says what is wrong with it."""

    regex = "[\\s\\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anypath", _AnyPath())


def _door(request: Request) -> FrontDoor:
    door: FrontDoor = request.app.state.front_door
    return door


def openai_error(status: int, message: str, error_type: str, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> JSONResponse:  # fmt: skip
    """An error in OpenAI's shape, so SDKs raise their usual exceptions with the message."""
    return JSONResponse({"error": {"message": message, "type": error_type, "code": code}}, status, headers=headers)


def has_dot_segment(raw_path: bytes) -> bool:
    """True if a segment of the path is ``.`` or ``..``, as sent or percent-decoded.

    Such a path would leave ``/v1`` once normalised (httpx does) and reach the instance's own
    ``/sleep``, ``/collective_rpc`` and so on: the front door refuses it before routing.
    """
    return any(unquote_to_bytes(segment) in (b".", b"..") for segment in raw_path.split(b"/"))


def dot_segment_error() -> JSONResponse:
    """The answer to a path with ``.`` or ``..`` segments."""
    return openai_error(400, "The request path has '.' or '..' segments: send it without them.", "BadRequestError",
                        "invalid_path")  # fmt: skip


def _raw_path(request: Request) -> bytes:
    raw: bytes | None = request.scope.get("raw_path")
    return raw if raw is not None else request.url.path.encode()


def _model_entry(label: str, door: FrontDoor, created: int) -> dict[str, Any]:
    state = door.resolve(label)
    assert state is not None
    return {"id": label, "object": "model", "created": created, "owned_by": "vllm-launcher", "root": state.name,
            "state": state.phase.value}  # fmt: skip


async def list_models(request: Request) -> JSONResponse:
    """``GET /v1/models``: every name and alias, with its model's state."""
    door = _door(request)
    created = int(time.time())
    return JSONResponse({"object": "list", "data": [_model_entry(label, door, created) for label, _ in door.labels()]})


async def get_model(request: Request) -> JSONResponse:
    """``GET /v1/models/{model}``: one name or alias."""
    if has_dot_segment(_raw_path(request)):
        return dot_segment_error()
    label = request.path_params["model"]
    door = _door(request)
    if door.resolve(label) is None:
        return openai_error(404, f"The model '{label}' does not exist.", "NotFoundError", "model_not_found")
    return JSONResponse(_model_entry(label, door, int(time.time())))


def _model_name(body: bytes) -> str | JSONResponse:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return openai_error(400, f"The request body is not valid JSON: {exc}", "BadRequestError", "invalid_json")
    except RecursionError:
        return openai_error(400, "The request body is nested too deeply to read.", "BadRequestError", "invalid_json")
    if not isinstance(data, dict):
        return openai_error(400, "The request body must be a JSON object.", "BadRequestError", "invalid_body")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        return openai_error(400, "The request body must name a model: add \"model\": \"<name>\" "
                            "(GET /v1/models lists them).", "BadRequestError", "model_required")  # fmt: skip
    return model


class _UpstreamResponse(StreamingResponse):
    """vLLM's answer, passed on chunk by chunk; the lease is given back however it ends."""

    def __init__(self, upstream: httpx.Response, door: FrontDoor, lease: Lease) -> None:
        super().__init__(_relay(upstream, door, lease), status_code=upstream.status_code)
        self.raw_headers = _passed_headers(upstream.headers.raw, _RESPONSE_HEADERS_DROPPED)
        self._upstream = upstream
        self._door = door
        self._lease = lease

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            # A client that goes away cancels this; closing the upstream connection then makes
            # vLLM abort the request (it stops generating).
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._upstream.aclose()
            finally:
                self._door.release(self._lease)


async def _relay(upstream: httpx.Response, door: FrontDoor, lease: Lease) -> AsyncIterator[bytes]:
    """The upstream body; an upstream that fails or goes silent mid-answer ends it, said once in the log
    and, for a stream, with an OpenAI-shaped error event the client can read."""
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        what = "stopped sending (read timeout)" if isinstance(exc, httpx.ReadTimeout) else f"failed: {exc!r}"
        message = f"The model's instance {lease.record.instance_id} {what} in the middle of its answer."
        log.warning("model %s: %s", lease.state.name, message)
        door.metrics.upstream_errors.labels(model=lease.state.name).inc()
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            error = {"error": {"message": message, "type": "ServiceUnavailableError", "code": "upstream_failed"}}
            yield f"data: {json.dumps(error)}\n\n".encode()


def _passed_headers(headers: Iterable[tuple[bytes, bytes]], dropped: frozenset[str]) -> list[tuple[bytes, bytes]]:
    """``headers`` less the hop-by-hop ones: ``dropped`` and those the ``Connection`` header names."""
    headers = list(headers)
    named = {
        token.strip().lower()
        for name, value in headers
        if name.decode("latin-1").lower() == "connection"
        for token in value.decode("latin-1").split(",")
    }
    return [(name, value) for name, value in headers if (key := name.decode("latin-1").lower()) not in dropped
            and key not in named]  # fmt: skip


def _forwarded_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return _passed_headers(headers, _REQUEST_HEADERS_DROPPED)


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None (``work`` cancelled) if the client hangs up first.

    The body is read already, so the next ASGI message is ``http.disconnect`` once the client is gone.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def proxy(request: Request) -> StreamingResponse | JSONResponse:
    """``POST /v1/...``: route by ``"model"`` to that model's instance, starting it if needed."""
    if has_dot_segment(_raw_path(request)):
        return dot_segment_error()
    door = _door(request)
    cap = request.app.state.settings.proxy_max_body_bytes
    body = await read_capped(request, cap)
    if body is None:
        return openai_error(413, f"The request body exceeds the {cap}-byte limit.", "BadRequestError",
                            "request_too_large")  # fmt: skip
    model = _model_name(body)
    if isinstance(model, JSONResponse):
        return model
    state = door.resolve(model)
    if state is None:
        door.metrics.requests.labels(model=UNKNOWN_MODEL_LABEL, status="404").inc()
        return openai_error(404, f"The model '{model}' does not exist (GET /v1/models lists them).", "NotFoundError",
                            "model_not_found")  # fmt: skip
    answer: StreamingResponse | JSONResponse
    try:
        lease = await _unless_client_leaves(request, door.acquire(state))
    except StartFailed as exc:
        answer = openai_error(502, str(exc), "ServiceUnavailableError", "model_start_failed")
    except NoRoom as exc:
        answer = openai_error(503, str(exc), "ServiceUnavailableError", "no_room",
                              headers={"Retry-After": RETRY_AFTER_SECONDS})  # fmt: skip
    except NotFound as exc:
        answer = openai_error(404, str(exc), "NotFoundError", "model_not_found")
    else:
        if lease is None:  # the client left while it waited: it is out of the queue, nothing to send
            door.metrics.requests.labels(model=state.name, status="499").inc()
            return JSONResponse({}, status_code=499)
        answer = await _send_upstream(request, door, lease, body)
    door.metrics.requests.labels(model=state.name, status=str(answer.status_code)).inc()
    return answer


async def _send_upstream(
    request: Request, door: FrontDoor, lease: Lease, body: bytes
) -> StreamingResponse | JSONResponse:
    record = lease.record
    # The path as the client sent it (still percent-encoded), not as Starlette decoded it.
    url = f"http://{readiness.probe_host(record.host)}:{record.port}{_raw_path(request).decode('latin-1')}"
    if request.url.query:
        url += "?" + request.url.query
    client: httpx.AsyncClient = request.app.state.proxy_client
    try:
        upstream_request = client.build_request(
            request.method, url, content=body, headers=_forwarded_headers(request.headers.raw)
        )
        upstream = await _unless_client_leaves(request, client.send(upstream_request, stream=True))
        if upstream is None:  # gone before vLLM's headers: the upstream request is closed, vLLM aborts it
            door.release(lease)
            return JSONResponse({}, status_code=499)
    except httpx.InvalidURL as exc:
        door.release(lease)
        return openai_error(400, f"The request path cannot be passed on: {exc}", "BadRequestError", "invalid_path")
    except httpx.HTTPError as exc:
        door.release(lease)
        return openai_error(502, f"The model's instance {record.instance_id} did not answer: {exc}",
                            "ServiceUnavailableError", "upstream_unreachable")  # fmt: skip
    except BaseException:
        door.release(lease)
        raise
    return _UpstreamResponse(upstream, door, lease)


# ---------------------------------------------------------------------- /v2/vllm/models


async def list_profiles(request: Request) -> JSONResponse:
    """``GET /v2/vllm/models``: every profile with its state."""
    door = _door(request)
    models = [state.to_json(door.default_idle_timeout) for state in door.states()]
    return JSONResponse({"idle_timeout": door.default_idle_timeout, "models": models, "count": len(models)})


async def get_profile(request: Request) -> JSONResponse:
    """``GET /v2/vllm/models/{name}``: one profile (by name or alias) with its state."""
    return JSONResponse(_profile_state(request).to_json(_door(request).default_idle_timeout))


async def put_profile(request: Request) -> JSONResponse:
    """``PUT /v2/vllm/models/{name}``: add (201) or replace (200) a profile."""
    door = _door(request)
    name = request.path_params["name"]
    data = await read_json_body(request, what="a JSON object: a model profile with at least 'options'")
    try:
        profile = ModelProfile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(plain_errors(exc, model=name))
        raise Unprocessable(f"invalid model profile: {problems}"[:2000]) from None
    try:
        check_name(name)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    # Options vLLM's parser rejects are the client's mistake, said now rather than at the first request.
    await request.app.state.manager.validate(profile.instance_config(name))
    try:
        state, created = door.put_profile(name, profile)
    except ProfileError as exc:
        raise Conflict(str(exc)) from None
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return JSONResponse(state.to_json(door.default_idle_timeout), status_code=201 if created else 200)


def _profile_state(request: Request) -> ModelState:
    state = _door(request).resolve(request.path_params["name"])
    if state is None:
        raise NotFound(f"model {request.path_params['name']!r} not found")
    return state


async def profile_log(request: Request) -> Response:
    """``GET /v2/vllm/models/{name}/log``: the end of the log of the model's last failed start.

    A failed start's instance is removed (nothing is left behind); its log's end is kept here.
    A running model's log is its instance's: ``/v2/vllm/instances/{id}/log``.
    """
    state = _profile_state(request)
    if state.failed_log is None:
        where = f"; its instance's log: /v2/vllm/instances/{state.instance_id}/log" if state.instance_id else ""
        raise NotFound(f"model {state.name!r} has no failed start to show{where}")
    return PlainTextResponse(state.failed_log)


async def start_profile(request: Request) -> JSONResponse:
    """``POST /v2/vllm/models/{name}/start``: start the model now; answers once it is ready."""
    door = _door(request)
    state = _profile_state(request)
    try:
        await door.start_model(state)
    except (StartFailed, NoRoom) as exc:
        raise ServiceUnavailable(str(exc), headers={"Retry-After": RETRY_AFTER_SECONDS}) from None
    return JSONResponse(state.to_json(door.default_idle_timeout))


async def warm_profile(request: Request) -> JSONResponse:
    """``POST /v2/vllm/models/{name}/warm``: compile the model ahead now; answers at once (202)."""
    door = _door(request)
    state = _profile_state(request)
    door.warm(state)
    return JSONResponse(state.to_json(door.default_idle_timeout), status_code=202)


async def stop_profile(request: Request) -> JSONResponse:
    """``POST /v2/vllm/models/{name}/stop``: stop its instance once idle; answers once it is gone."""
    door = _door(request)
    state = _profile_state(request)
    await door.stop_model(state)
    return JSONResponse(state.to_json(door.default_idle_timeout))


async def delete_profile(request: Request) -> JSONResponse:
    """``DELETE /v2/vllm/models/{name}``: remove a profile; answers once its instance is gone."""
    name = request.path_params["name"]
    await _door(request).delete_profile(name)
    return JSONResponse({"status": "deleted", "name": name})


def front_door_routes() -> list[Route]:
    """The front door's routes, for the app."""
    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:anypath}", get_model, methods=["GET"]),
        Route("/v1/{path:anypath}", proxy, methods=["POST"]),
        Route("/v2/vllm/models", list_profiles, methods=["GET"]),
        Route("/v2/vllm/models/{name:anypath}/start", start_profile, methods=["POST"]),
        Route("/v2/vllm/models/{name:anypath}/stop", stop_profile, methods=["POST"]),
        Route("/v2/vllm/models/{name:anypath}/warm", warm_profile, methods=["POST"]),
        Route("/v2/vllm/models/{name:anypath}/log", profile_log, methods=["GET"]),
        Route("/v2/vllm/models/{name:anypath}", get_profile, methods=["GET"]),
        Route("/v2/vllm/models/{name:anypath}", put_profile, methods=["PUT"]),
        Route("/v2/vllm/models/{name:anypath}", delete_profile, methods=["DELETE"]),
    ]
