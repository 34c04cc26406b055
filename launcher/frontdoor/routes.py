"""The front door's HTTP side: ``/v1/models`` and ``/v2/vllm/models``; ``POST /v1/...`` is
:mod:`launcher.frontdoor.proxy`'s. ``/v1`` errors use OpenAI's shape ``{"error": {"message",
"type", "code"}}``; ``/v2/vllm/models`` errors the launcher's ``{"detail"}``.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import ValidationError
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from launcher.errors import BadRequest, Conflict, NotFound, ServiceUnavailable, Unprocessable
from launcher.frontdoor.door import FrontDoor
from launcher.frontdoor.errors import dot_segment_error, has_dot_segment, openai_error
from launcher.frontdoor.live_config import LiveConfig
from launcher.frontdoor.model_state import ModelInvalid, ModelState, NoRoom, StartFailed
from launcher.frontdoor.profiles import ModelProfile, ProfileError, check_name, plain_errors
from launcher.frontdoor.proxy import RETRY_AFTER_SECONDS, OpenAIProxy
from launcher.instances.config import did_you_mean
from launcher.request_body import read_json_body


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


def _raw_path(request: Request) -> bytes:
    raw: bytes | None = request.scope.get("raw_path")
    return raw if raw is not None else request.url.path.encode()


def _model_entry(label: str, door: FrontDoor, created: int) -> dict[str, Any]:
    state = door.resolve(label)
    assert state is not None
    return {"id": label, "object": "model", "created": created, "owned_by": "vllm-launcher", "root": state.name,
            "state": state.shown_state()}  # fmt: skip


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
        hint = did_you_mean(label, [name for name, _ in door.labels()])
        return openai_error(404, f"The model '{label}' does not exist{hint}.", "NotFoundError", "model_not_found")
    return JSONResponse(_model_entry(label, door, int(time.time())))


# ---------------------------------------------------------------------- /v2/vllm/models


async def list_profiles(request: Request) -> JSONResponse:
    """``GET /v2/vllm/models``: every profile with its state."""
    door = _door(request)
    models = [door.describe(state) for state in door.states()]
    return JSONResponse({"idle_timeout": door.default_idle_timeout, "models": models, "count": len(models),
                         "memory": door.fitting.memory_use(), **_live(request).describe()})  # fmt: skip


def _live(request: Request) -> LiveConfig:
    live: LiveConfig = request.app.state.live_config
    return live


async def reload_profiles(request: Request) -> JSONResponse:
    """``POST /v2/vllm/models/reload``: read the models file again now; what changed, or 422 with its error."""
    live = _live(request)
    if not live.path:
        raise Conflict("the launcher has no models file to reload (start it with --models-file PATH)")
    try:
        changes = await live.reload(why="POST /v2/vllm/models/reload")
    except ProfileError as exc:
        raise Unprocessable(f"the models file was not reloaded, the running models stay: {exc}") from None
    return JSONResponse({"models_file": live.path, **changes.to_json()})


async def get_profile(request: Request) -> JSONResponse:
    """``GET /v2/vllm/models/{name}``: one profile (by name or alias) with its state."""
    return JSONResponse(_door(request).describe(_profile_state(request)))


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
    live = _live(request)
    try:
        state, created = await live.put(name, profile)
    except ProfileError as exc:
        raise Conflict(str(exc)) from None
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    answer = door.describe(state)
    warning = live.describe().get("warning")
    if warning:
        answer["warning"] = warning  # changes last until a restart: said with each one
    return JSONResponse(answer, status_code=201 if created else 200)


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
    except ModelInvalid as exc:
        raise ServiceUnavailable(str(exc)) from None
    except (StartFailed, NoRoom) as exc:
        raise ServiceUnavailable(str(exc), headers={"Retry-After": RETRY_AFTER_SECONDS}) from None
    return JSONResponse(door.describe(state))


async def warm_profile(request: Request) -> JSONResponse:
    """``POST /v2/vllm/models/{name}/warm``: compile the model ahead now; answers at once (202)."""
    door = _door(request)
    state = _profile_state(request)
    try:
        door.warm(state)
    except ModelInvalid as exc:
        raise Conflict(str(exc)) from None
    return JSONResponse(door.describe(state), status_code=202)


async def stop_profile(request: Request) -> JSONResponse:
    """``POST /v2/vllm/models/{name}/stop``: stop its instance once idle; answers once it is gone."""
    door = _door(request)
    state = _profile_state(request)
    await door.stop_model(state)
    return JSONResponse(door.describe(state))


async def delete_profile(request: Request) -> JSONResponse:
    """``DELETE /v2/vllm/models/{name}``: remove a profile; answers once its instance is gone."""
    name = request.path_params["name"]
    await _live(request).delete(name)
    return JSONResponse({"status": "deleted", "name": name})


def front_door_routes() -> list[Route]:
    """The front door's routes, for the app."""
    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:anypath}", get_model, methods=["GET"]),
        Route("/v1/{path:anypath}", OpenAIProxy(), methods=["POST"]),  # plain ASGI: the hot path
        Route("/v2/vllm/models", list_profiles, methods=["GET"]),
        Route("/v2/vllm/models/reload", reload_profiles, methods=["POST"]),
        Route("/v2/vllm/models/{name:anypath}/start", start_profile, methods=["POST"]),
        Route("/v2/vllm/models/{name:anypath}/stop", stop_profile, methods=["POST"]),
        Route("/v2/vllm/models/{name:anypath}/warm", warm_profile, methods=["POST"]),
        Route("/v2/vllm/models/{name:anypath}/log", profile_log, methods=["GET"]),
        Route("/v2/vllm/models/{name:anypath}", get_profile, methods=["GET"]),
        Route("/v2/vllm/models/{name:anypath}", put_profile, methods=["PUT"]),
        Route("/v2/vllm/models/{name:anypath}", delete_profile, methods=["DELETE"]),
    ]
