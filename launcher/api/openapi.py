"""The OpenAPI 3.1 document of ``GET /openapi.json``, built from one table and the pydantic models.

Request and response bodies come from the models (:class:`launcher.instances.config.VllmConfig` and
:mod:`launcher.api.schemas`), so the document cannot drift from what the code validates; the tests
check that every route of the app is in :data:`OPERATIONS` (and the reverse) and that real
answers of a running launcher validate against the document.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, NamedTuple

from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from forkserver.protocol import INSTANCE_ID_PATTERN
from launcher import __version__
from launcher.api.schemas import (
    RESPONSE_MODELS,
    CreateResponse,
    DeleteAllResponse,
    DeleteResponse,
    ErrorResponse,
    GpuList,
    HealthResponse,
    IndexResponse,
    InstanceIdList,
    InstanceList,
    InstanceState,
    ModelDeleted,
    ModelList,
    ModelState,
    OpenAIError,
    OpenAIModel,
    OpenAIModelList,
    ReloadResult,
    WatchEvent,
)
from launcher.frontdoor.profiles import ModelProfile, OpenAIRequest
from launcher.instances.config import VllmConfig

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
NDJSON = "application/x-ndjson"
PROMETHEUS = CONTENT_TYPE_LATEST  # what GET /metrics sends (the Prometheus text format)

REF = "#/components/schemas/{model}"
SECURITY_SCHEME = "bearerAuth"

# A response body: a model, several models (oneOf), or a raw JSON schema (non-JSON media types).
Body = type[BaseModel] | tuple[type[BaseModel], ...] | dict[str, Any] | None


class Answer(NamedTuple):
    """One documented response: body, description, media type and response headers."""

    body: Body
    description: str
    media_type: str = JSON
    headers: dict[str, str] | None = None  # header name -> description (always sent)


class Operation(NamedTuple):
    """One row of the table: a method on a path."""

    method: str
    path: str
    operation_id: str
    summary: str
    request: type[BaseModel] | None
    responses: dict[int, Answer]
    parameters: tuple[str, ...] = ()  # names in PARAMETERS
    secured: bool = True  # 401 without the bearer token, when the launcher has one


def _error(description: str, headers: dict[str, str] | None = None) -> Answer:
    return Answer(ErrorResponse, description, JSON, headers)


UNAUTHORIZED = _error(
    "missing or wrong bearer token (only when the launcher runs with --api-token or --api-token-file)",
    {"WWW-Authenticate": 'Bearer realm="vllm-launcher"'},
)
_CREATE_ERRORS: dict[int, Answer] = {
    400: _error("bad JSON, options that cannot be split or that the vLLM parser rejects, unknown GPU UUIDs"),
    409: _error("the port is used by another instance or process"),
    413: _error("the body is larger than --max-body-bytes (64 KiB by default)"),
    415: _error("the content type is not application/json"),
    422: _error("the body is JSON of the wrong shape (unknown fields, non-string values, missing options)"),
    429: _error("the launcher already runs --max-instances instances", {"Retry-After": "seconds to wait"}),
    500: _error("the forkserver failed to create the instance"),
    503: _error("the forkserver is not available (preloading or restarting)"),
}

PARAMETERS: dict[str, dict[str, Any]] = {
    "instance_id": {
        "name": "instance_id",
        "in": "path",
        "required": True,
        "description": "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit ('watch' is reserved)",
        "schema": {"type": "string", "pattern": f"^{INSTANCE_ID_PATTERN}$"},
    },
    "detail": {
        "name": "detail",
        "in": "query",
        "required": False,
        "description": "full states (True, the default) or ids only (False); case-insensitive, also 1/0 and yes/no",
        "schema": {
            "type": "string",
            "enum": ["True", "False", "true", "false", "1", "0", "yes", "no"],
            "default": "True",
        },
    },
    "since": {
        "name": "since",
        "in": "query",
        "required": False,
        "description": "replay the kept events after this revision, then follow; without it, a CREATED event "
        "for each existing instance comes first",
        "schema": {"type": "integer", "minimum": 0},
    },
    "range": {
        "name": "Range",
        "in": "header",
        "required": False,
        "description": "one byte range, 'bytes=START-END' (inclusive) or 'bytes=START-'; suffix ranges, several "
        "ranges and other units are a 400",
        "schema": {"type": "string", "pattern": r"^bytes=[0-9]+-[0-9]*$"},
    },
}

PARAMETERS.update({
    "asset": {"name": "asset", "in": "path", "required": True, "description": "app.js or style.css",
              "schema": {"type": "string"}},
    "name": {"name": "name", "in": "path", "required": True,
             "description": "a model name (or, for GET, an alias): 1-256 printable characters, no spaces",
             "schema": {"type": "string"}},
    "model": {"name": "model", "in": "path", "required": True, "description": "a model name or alias",
              "schema": {"type": "string"}},
    "path": {"name": "path", "in": "path", "required": True,
             "description": "vLLM's OpenAI route: completions, chat/completions, embeddings, responses, tokenize, ...",
             "schema": {"type": "string"}},
})  # fmt: skip


def _openai_error(description: str, headers: dict[str, str] | None = None) -> Answer:
    return Answer(OpenAIError, description, JSON, headers)


UNAUTHORIZED_OPENAI = _openai_error(
    "missing or wrong bearer token (only when the launcher runs with a token): OpenAI's shape, so SDKs raise "
    "AuthenticationError",
    {"WWW-Authenticate": 'Bearer realm="vllm-launcher"'},
)
_INSTANCE = "/v2/vllm/instances/{instance_id}"
_MODEL = "/v2/vllm/models/{name}"
_NOT_FOUND = _error("no instance with this id")

OPERATIONS: tuple[Operation, ...] = (
    Operation("GET", "/", "index", "Service name, version and endpoints", None,
              {200: Answer(IndexResponse, "the service"),
               303: Answer(None, "a browser (Accept: text/html) is sent to the dashboard", JSON,
                           {"Location": "/ui"})}),
    Operation("GET", "/ui", "dashboard", "The dashboard (HTML)", None,
              {200: Answer({"type": "string"}, "the page", "text/html")}, secured=False),
    Operation("GET", "/ui/{asset}", "dashboard_asset", "The dashboard's script and style sheet", None,
              {200: Answer({"type": "string"}, "app.js or style.css", "text/plain"),
               404: _error("no such file")}, parameters=("asset",), secured=False),
    Operation("GET", "/health", "health", "Whether instances can be created", None,
              {200: Answer(HealthResponse, "the forkserver is ready: status OK"),
               503: Answer(HealthResponse, "the forkserver is preloading or restarting: status unavailable")},
              secured=False),
    Operation("GET", "/openapi.json", "openapi", "This document", None,
              {200: Answer({"type": "object"}, "the OpenAPI 3.1 document")}),
    Operation("GET", "/metrics", "metrics", "Prometheus metrics", None,
              {200: Answer({"type": "string"}, "metrics in the Prometheus text format", PROMETHEUS)}),
    Operation("POST", "/v2/vllm/instances", "create_instance", "Create an instance with a new UUID", VllmConfig,
              {201: Answer(CreateResponse, "the instance is forked (not yet ready: see its state's 'ready')"),
               **_CREATE_ERRORS}),
    Operation("GET", "/v2/vllm/instances", "get_all_instances", "List the instances", None,
              {200: Answer((InstanceList, InstanceIdList), "full states (detail=True) or ids (detail=False)"),
               400: _error("invalid detail value")},
              parameters=("detail",)),
    Operation("DELETE", "/v2/vllm/instances", "delete_all_instances", "Stop and delete every instance", None,
              {200: Answer(DeleteAllResponse, "every instance is stopped, no process of any is left")}),
    Operation("GET", "/v2/vllm/instances/watch", "watch_instances", "Follow instance events (NDJSON stream)", None,
              {200: Answer(WatchEvent, "one event per line, until the launcher stops or the watcher falls behind "
                           "(then an ERROR event says where to resume)", NDJSON),
               400: _error("since is not a revision number, or is in the future"),
               410: _error("since is older than the kept window: watch without since")},
              parameters=("since",)),
    Operation("GET", "/v2/vllm/gpus", "list_gpus", "The node's GPUs and the instances using each", None,
              {200: Answer(GpuList, "the GPUs (NVML, or the mock set)")}),
    Operation("PUT", _INSTANCE, "create_named_instance", "Create an instance with this id", VllmConfig,
              {201: Answer(CreateResponse, "the instance is forked (not yet ready: see its state's 'ready')"),
               **_CREATE_ERRORS,
               400: _error("invalid or reserved id; bad JSON, options the vLLM parser rejects, unknown GPU UUIDs"),
               409: _error("an instance with this id exists, or the port is used")},
              parameters=("instance_id",)),
    Operation("GET", _INSTANCE, "get_instance_status", "One instance's state", None,
              {200: Answer(InstanceState, "the instance's state"), 404: _NOT_FOUND},
              parameters=("instance_id",)),
    Operation("DELETE", _INSTANCE, "delete_instance", "Stop and delete an instance", None,
              {200: Answer(DeleteResponse, "no process of the instance is left; its log is removed"), 404: _NOT_FOUND},
              parameters=("instance_id",)),
    Operation("GET", _INSTANCE + "/log", "get_instance_logs", "The instance's stdout and stderr, raw", None,
              {200: Answer({"type": "string", "format": "binary"}, "no Range: the first MiB of the log", OCTET_STREAM),
               206: Answer({"type": "string", "format": "binary"}, "the requested range, at most 1 MiB", OCTET_STREAM,
                           {"Content-Range": "bytes START-END/TOTAL"}),
               400: _error("a Range this endpoint does not serve"),
               404: _NOT_FOUND,
               416: Answer(None, "the range starts at or past the end of the log (empty body)", JSON,
                           {"Content-Range": "bytes */TOTAL"})},
              parameters=("instance_id", "range")),
    Operation("GET", "/v1/models", "list_models", "Front door: every model name and alias (OpenAI format)", None,
              {200: Answer(OpenAIModelList, "one entry per name and alias, with its model's state")}),
    Operation("GET", "/v1/models/{model}", "get_model", "Front door: one model name or alias", None,
              {200: Answer(OpenAIModel, "the entry"), 404: _openai_error("no model has this name or alias")},
              parameters=("model",)),
    Operation("POST", "/v1/{path}", "openai_request",
              "Front door: an OpenAI request, routed by its model (started first if it is stopped)", OpenAIRequest,
              {200: Answer({"type": "object"}, "vLLM's answer, passed through unchanged (text/event-stream when "
                           "the request streams); vLLM's own error statuses pass through too"),
               400: _openai_error("the body is not a JSON object or names no model"),
               404: _openai_error("no model has this name or alias"),
               413: _openai_error("the body is larger than --proxy-max-body-bytes"),
               502: _openai_error("the model's instance could not be started (one line: the reason; the end of its "
                                  "log at GET /v2/vllm/models/{name}/log) "
                                  "or did not answer"),
               503: _openai_error("no room for the model within --queue-timeout (Retry-After), or its profile "
                                  "cannot run (model_invalid)", {"Retry-After": "seconds"})},
              parameters=("path",)),
    Operation("GET", "/v2/vllm/models", "list_model_profiles", "Front door: every model profile and its state",
              None, {200: Answer(ModelList, "the profiles")}),
    Operation("POST", "/v2/vllm/models/reload", "reload_model_profiles",
              "Front door: read the models file again now (it is also reloaded when it changes)", None,
              {200: Answer(ReloadResult, "applied: what was added, removed and changed"),
               409: _error("the launcher has no models file"),
               422: _error("the models file cannot be read (file, line, what is wrong); the running models stay")}),
    Operation("GET", _MODEL, "get_model_profile", "Front door: one model profile and its state", None,
              {200: Answer(ModelState, "the profile"), 404: _error("no model has this name or alias")},
              parameters=("name",)),
    Operation("PUT", _MODEL, "put_model_profile", "Front door: add or replace a model profile", ModelProfile,
              {200: Answer(ModelState, "replaced (a running instance with another configuration stops once idle)"),
               201: Answer(ModelState, "added"),
               400: _error("bad JSON, an invalid name, or options the vLLM parser rejects"),
               409: _error("a name or alias is used by another model, or the models file cannot be written "
                           "(read-only) or has an error to fix first"),
               413: _error("the body is larger than --max-body-bytes"),
               415: _error("the content type is not application/json"),
               422: _error("the body is JSON of the wrong shape"),
               503: _error("the forkserver is not available to check the options (preloading or restarting)")},
              parameters=("name",)),
    Operation("POST", _MODEL + "/start", "start_model", "Front door: start a model now; answers once it is ready",
              None, {200: Answer(ModelState, "the model is ready"), 404: _error("no model has this name or alias"),
                     503: _error("it failed to start, or there was no room", {"Retry-After": "seconds"})},
              parameters=("name",)),
    Operation("POST", _MODEL + "/warm", "warm_model",
              "Front door: compile a model ahead of its first request, in a throwaway instance at low priority; "
              "answers at once", None,
              {202: Answer(ModelState, "asked for (see 'compiled'); nothing to do if it is compiled already"),
               404: _error("no model has this name or alias")},
              parameters=("name",)),
    Operation("GET", _MODEL + "/log", "get_model_failed_log",
              "Front door: the end of the log of the model's last failed start (its instance is removed)", None,
              {200: Answer({"type": "string"}, "the last lines of that log", "text/plain"),
               404: _error("no model has this name or alias, or none of its starts failed")},
              parameters=("name",)),
    Operation("POST", _MODEL + "/stop", "stop_model",
              "Front door: stop a model's instance once no request is in flight; answers once it is gone", None,
              {200: Answer(ModelState, "the model is stopped"), 404: _error("no model has this name or alias")},
              parameters=("name",)),
    Operation("DELETE", _MODEL, "delete_model_profile",
              "Front door: remove a model profile; answers once its instance is gone", None,
              {200: Answer(ModelDeleted, "the profile and its instance are gone"),
               404: _error("no model has this name"),
               409: _error("the models file cannot be written (read-only) or has an error to fix first")},
              parameters=("name",)),
)  # fmt: skip


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": REF.format(model=model.__name__)}


def _body_schema(body: Body) -> dict[str, Any]:
    if isinstance(body, tuple):
        return {"oneOf": [_ref(model) for model in body]}
    if isinstance(body, dict):
        return body
    assert body is not None
    return _ref(body)


def _response(answer: Answer) -> dict[str, Any]:
    response: dict[str, Any] = {"description": answer.description}
    if answer.headers:
        response["headers"] = {
            name: {"description": text, "required": True, "schema": {"type": "string"}}
            for name, text in answer.headers.items()
        }
    if answer.body is not None:
        response["content"] = {answer.media_type: {"schema": _body_schema(answer.body)}}
    return response


def _operation(op: Operation) -> dict[str, Any]:
    responses = dict(op.responses)
    if op.secured:
        responses.setdefault(401, UNAUTHORIZED_OPENAI if op.path.startswith("/v1/") else UNAUTHORIZED)
    item: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "responses": {str(code): _response(responses[code]) for code in sorted(responses)},
    }
    if op.parameters:
        item["parameters"] = [PARAMETERS[name] for name in op.parameters]
    if op.request is not None:
        item["requestBody"] = {"required": True, "content": {JSON: {"schema": _ref(op.request)}}}
    # The token is optional (only when configured): '{}' is "no authentication" as an alternative.
    item["security"] = [{SECURITY_SCHEME: []}, {}] if op.secured else []
    return item


def component_schemas() -> dict[str, Any]:
    """Every model's JSON schema, with references between them as ``#/components/schemas/...``."""
    models: list[type[BaseModel]] = [VllmConfig, ModelProfile, OpenAIRequest, *RESPONSE_MODELS]
    _, definitions = models_json_schema([(model, "validation") for model in models], ref_template=REF)
    schemas: dict[str, Any] = definitions["$defs"]
    return schemas


@functools.lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Multi-Instance vLLM Management API",
            "version": __version__,
            "description": "Creates, lists, inspects and deletes vLLM OpenAI-compatible servers forked from a "
            'preloaded process. Errors are JSON {"detail": "..."}.',
        },
        "paths": paths,
        "components": {
            "schemas": component_schemas(),
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "required on every endpoint but /health when the launcher has a token",
                }
            },
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh copy: callers may change it)."""
    return copy.deepcopy(_document())
