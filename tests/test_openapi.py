"""``GET /openapi.json``: complete (every route, and nothing else), valid OpenAPI 3.1, and true.

"True" means: real answers of a running launcher (stand-in workload) validate against both the
pydantic models of :mod:`launcher.api.schemas` and the JSON schemas of the served document.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate as validate_spec
from pydantic import BaseModel
from starlette.routing import Route

from launcher.api import schemas
from launcher.api.openapi import OPERATIONS, openapi_document
from launcher.app import create_app
from tests.launcher_process import LauncherProcess, free_port, wait_until

# Starlette answers HEAD on every GET route by itself; the document describes GET only.
IMPLICIT_METHODS = {"HEAD"}


def _app_operations() -> set[tuple[str, str]]:
    operations = set()
    for route in create_app().routes:
        assert isinstance(route, Route), f"unexpected route type {route!r}"
        for method in (route.methods or set()) - IMPLICIT_METHODS:
            # Starlette's "{name:path}" converter is plain "{name}" in OpenAPI's path templates.
            operations.add((method, re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)))
    return operations


def _document_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item}


def test_every_route_is_documented_and_every_documented_operation_exists() -> None:
    document = openapi_document()
    in_app = _app_operations()
    in_document = _document_operations(document)
    missing_from_app = in_document - in_app
    # /metrics is added to the app by the metrics work, which may land separately; while the app
    # has no /metrics route at all, tolerate exactly that one documented-but-absent operation.
    if not any(path == "/metrics" for _, path in in_app):
        missing_from_app -= {("GET", "/metrics")}
    assert in_app - in_document == set(), "routes missing from the OpenAPI document"
    assert missing_from_app == set(), "documented operations the app does not have"
    assert len(OPERATIONS) == len({(op.method, op.path) for op in OPERATIONS}), "an operation is listed twice"


def test_document_is_valid_openapi_3_1() -> None:
    document = openapi_document()
    assert document["openapi"].startswith("3.1")
    validate_spec(document)


def test_every_schema_reference_resolves_and_components_are_used() -> None:
    document = openapi_document()
    refs: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    names = set(document["components"]["schemas"])
    assert {ref.rsplit("/", 1)[1] for ref in refs} <= names
    assert all(ref.startswith("#/components/schemas/") for ref in refs)
    # Every response model is in the components (some, like Gpu, only through references).
    assert {model.__name__ for model in schemas.RESPONSE_MODELS} | {"VllmConfig"} <= names


def test_document_details() -> None:
    document = openapi_document()
    paths = document["paths"]
    create = paths["/v2/vllm/instances"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/VllmConfig"}
    assert {"201", "400", "401", "413", "415", "422", "429", "500", "503"} <= set(create["responses"])
    assert "409" in paths["/v2/vllm/instances/{instance_id}"]["put"]["responses"]
    log = paths["/v2/vllm/instances/{instance_id}/log"]["get"]
    assert {"200", "206", "400", "404", "416"} <= set(log["responses"])
    assert "application/octet-stream" in log["responses"]["206"]["content"]
    assert log["responses"]["206"]["headers"]["Content-Range"]["required"] is True
    assert "content" not in log["responses"]["416"] and "Content-Range" in log["responses"]["416"]["headers"]
    assert {param["name"] for param in log["parameters"]} == {"instance_id", "Range"}
    watch = paths["/v2/vllm/instances/watch"]["get"]
    assert "application/x-ndjson" in watch["responses"]["200"]["content"]
    assert {"400", "410"} <= set(watch["responses"]) and watch["parameters"][0]["name"] == "since"
    assert paths["/v2/vllm/instances"]["get"]["parameters"][0]["name"] == "detail"
    for path, item in paths.items():
        for method, operation in item.items():
            is_open = path == "/health" or path.startswith("/ui")  # the dashboard's page holds no data
            assert ("401" in operation["responses"]) == (not is_open), (method, path)
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


# ---------------------------------------------------------------- real answers against the document


@pytest.fixture(scope="module")
def launcher(standin: LauncherProcess) -> LauncherProcess:
    """The shared stand-in launcher (tests/conftest.py), 4 mock GPUs."""
    return standin


@pytest.fixture(scope="module")
def served(launcher: LauncherProcess) -> dict[str, Any]:
    response = launcher.client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document: dict[str, Any] = response.json()
    return document


def _check(
    document: dict[str, Any], method: str, path: str, response: httpx.Response, model: type[BaseModel] | None
) -> Any:
    """``response`` has a documented status, content type and body (pydantic model and JSON schema)."""
    operation = document["paths"][path][method.lower()]
    documented = operation["responses"].get(str(response.status_code))
    assert documented is not None, f"{method} {path} answered {response.status_code}, not documented: {response.text}"
    for header, spec in documented.get("headers", {}).items():
        if spec.get("required"):
            assert header in response.headers, f"{method} {path} {response.status_code}: no {header} header"
    if "content" not in documented:
        assert response.content == b""
        return None
    (media_type,) = documented["content"]
    assert response.headers["content-type"].split(";")[0] == media_type.split(";")[0]
    if media_type != "application/json":
        return response.content
    body = response.json()
    # The body schema, with the components beside it so that its "#/components/..." references resolve.
    schema = {**documented["content"][media_type]["schema"], "components": document["components"]}
    jsonschema.Draft202012Validator(schema).validate(body)
    if model is not None:
        model.model_validate(body)
    return body


def _schema_for(document: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_index_health_gpus_openapi_metrics(launcher: LauncherProcess, served: dict[str, Any]) -> None:
    client = launcher.client
    body = _check(served, "GET", "/", client.get("/"), schemas.IndexResponse)
    assert body["endpoints"]["openapi"] == "GET /openapi.json"
    assert _check(served, "GET", "/health", client.get("/health"), schemas.HealthResponse) == {"status": "OK"}
    gpus = _check(served, "GET", "/v2/vllm/gpus", client.get("/v2/vllm/gpus"), schemas.GpuList)
    assert gpus["count"] == 4 and gpus["mock"] is True
    _check(served, "GET", "/openapi.json", client.get("/openapi.json"), None)
    if "/metrics" in served["paths"] and any(route.path == "/metrics" for route in create_app().routes):  # type: ignore[attr-defined]
        _check(served, "GET", "/metrics", client.get("/metrics"), None)
    assert served == openapi_document()


def test_instance_lifecycle_answers_match_the_document(launcher: LauncherProcess, served: dict[str, Any]) -> None:
    client = launcher.client
    instances, one = "/v2/vllm/instances", "/v2/vllm/instances/{instance_id}"
    body = {
        "options": f"--model doc-model --port {free_port()} --host 127.0.0.1 --spam-lines 3",
        "env_vars": {"A": "1"},
        "gpu_uuids": ["GPU-1"],
        "annotations": {"team": "docs"},
    }
    created = _check(served, "PUT", one, client.put(f"{instances}/doc-a", json=body), schemas.CreateResponse)
    assert created["instance_id"] == "doc-a" and created["status"] == "started"
    posted = _check(
        served, "POST", instances,
        client.post(instances, json={"options": f"--model doc-model --port {free_port()} --host 127.0.0.1"}),
        schemas.CreateResponse,
    )  # fmt: skip
    state_schema = _schema_for(served, "InstanceState")
    state = wait_until(lambda: (s := launcher.state("doc-a"))["ready"] and s, 20, what="doc-a ready")
    state = _check(served, "GET", one, client.get(f"{instances}/doc-a"), schemas.InstanceState)
    state_schema.validate(state)
    assert state["annotations"] == {"team": "docs"} and state["gpu_uuids"] == ["GPU-1"]

    detailed = _check(served, "GET", instances, client.get(instances), schemas.InstanceList)
    assert detailed["total_instances"] == 2
    for item in detailed["instances"]:
        state_schema.validate(item)
    ids = _check(served, "GET", instances, client.get(instances, params={"detail": "False"}), schemas.InstanceIdList)
    assert sorted(ids["instance_ids"]) == sorted(["doc-a", posted["instance_id"]])
    gpus = _check(served, "GET", "/v2/vllm/gpus", client.get("/v2/vllm/gpus"), schemas.GpuList)
    assert gpus["gpus"][1]["instances"] == ["doc-a"]

    log = "/v2/vllm/instances/{instance_id}/log"
    wait_until(lambda: client.get(f"{instances}/doc-a/log").content.count(b"\n") >= 6, 10, what="log lines")
    whole = _check(served, "GET", log, client.get(f"{instances}/doc-a/log"), None)
    part = client.get(f"{instances}/doc-a/log", headers={"Range": "bytes=0-9"})
    assert _check(served, "GET", log, part, None) == whole[:10] and part.status_code == 206
    past = client.get(f"{instances}/doc-a/log", headers={"Range": f"bytes={10**9}-"})
    assert past.status_code == 416
    _check(served, "GET", log, past, None)

    # A stopped instance's state has the stop fields.
    crash = {"options": f"--model doc-model --port {free_port()} --host 127.0.0.1 --crash-after 0 --exit-code 4"}
    _check(served, "PUT", one, client.put(f"{instances}/doc-crash", json=crash), schemas.CreateResponse)
    stopped = wait_until(lambda: (s := launcher.state("doc-crash"))["status"] == "stopped" and s, 20, what="crash")
    stopped = _check(served, "GET", one, client.get(f"{instances}/doc-crash"), schemas.InstanceState)
    state_schema.validate(stopped)
    assert stopped["exit_code"] == 4 and isinstance(stopped["stopped_at"], float)

    deleted = _check(served, "DELETE", one, client.delete(f"{instances}/doc-a"), schemas.DeleteResponse)
    assert deleted["status"] == "terminated" and deleted["instance_id"] == "doc-a"
    assert deleted["annotations"] == {"team": "docs"} and deleted["revision"] > created["revision"]
    everything = _check(served, "DELETE", instances, client.delete(instances), schemas.DeleteAllResponse)
    assert everything["total_stopped"] == 2
    assert _check(served, "GET", instances, client.get(instances), schemas.InstanceList)["instances"] == []


def test_watch_events_match_the_document(launcher: LauncherProcess, served: dict[str, Any]) -> None:
    client = launcher.client
    since = client.get("/v2/vllm/instances").json()["revision"]
    options = f"--model doc-model --port {free_port()} --host 127.0.0.1"
    assert client.put("/v2/vllm/instances/doc-w", json={"options": options}).status_code == 201
    wait_until(lambda: launcher.state("doc-w")["ready"], 20, what="doc-w ready")
    assert client.delete("/v2/vllm/instances/doc-w").status_code == 200
    event_schema = _schema_for(served, "WatchEvent")
    lines: list[dict[str, Any]] = []
    with (
        httpx.Client(base_url=launcher.base_url, timeout=httpx.Timeout(10, read=2)) as watcher,
        watcher.stream("GET", "/v2/vllm/instances/watch", params={"since": since}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        try:
            for line in response.iter_lines():
                if line:
                    lines.append(json.loads(line))
                if len(lines) == 3:
                    break
        except httpx.ReadTimeout:
            pass
    assert [event["type"] for event in lines] == ["CREATED", "READY", "DELETED"]
    for event in lines:
        event_schema.validate(event)
        schemas.WatchEvent.model_validate(event)


@pytest.mark.parametrize(
    ("method", "path", "template", "kwargs", "status"),
    [
        ("GET", "/v2/vllm/instances/nope", "/v2/vllm/instances/{instance_id}", {}, 404),
        ("DELETE", "/v2/vllm/instances/nope", "/v2/vllm/instances/{instance_id}", {}, 404),
        ("GET", "/v2/vllm/instances/nope/log", "/v2/vllm/instances/{instance_id}/log", {}, 404),
        ("PUT", "/v2/vllm/instances/-bad", "/v2/vllm/instances/{instance_id}", {"json": {"options": "x"}}, 400),
        ("PUT", "/v2/vllm/instances/watch", "/v2/vllm/instances/{instance_id}", {"json": {"options": "x"}}, 400),
        (
            "POST",
            "/v2/vllm/instances",
            "/v2/vllm/instances",
            {"content": b"{", "headers": {"content-type": "application/json"}},
            400,
        ),
        ("POST", "/v2/vllm/instances", "/v2/vllm/instances", {"json": {"options": 5}}, 422),
        (
            "POST",
            "/v2/vllm/instances",
            "/v2/vllm/instances",
            {"content": b"a", "headers": {"content-type": "text/plain"}},
            415,
        ),
        ("POST", "/v2/vllm/instances", "/v2/vllm/instances", {"json": {"options": "x" * 70000}}, 413),
        ("POST", "/v2/vllm/instances", "/v2/vllm/instances", {"json": {"options": "--no-such-flag"}}, 400),
        ("GET", "/v2/vllm/instances?detail=maybe", "/v2/vllm/instances", {}, 400),
        ("GET", "/v2/vllm/instances/watch?since=x", "/v2/vllm/instances/watch", {}, 400),
        ("GET", "/v2/vllm/instances/watch?since=999999", "/v2/vllm/instances/watch", {}, 400),
    ],
)
def test_error_answers_match_the_document(
    launcher: LauncherProcess, served: dict[str, Any], method: str, path: str, template: str,
    kwargs: dict[str, Any], status: int,
) -> None:  # fmt: skip
    response = launcher.client.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    _check(served, method, template, response, schemas.ErrorResponse)


def test_conflict_and_limit_answers_match_the_document(served: dict[str, Any]) -> None:
    with_limit = LauncherProcess(workload="standin", env={"LAUNCHER_MAX_INSTANCES": "1", "LAUNCHER_STOP_TIMEOUT": "2"})
    try:
        client = with_limit.client
        one = "/v2/vllm/instances/{instance_id}"
        port = free_port()
        first = client.put("/v2/vllm/instances/lim", json={"options": f"--model m --port {port} --host 127.0.0.1"})
        _check(served, "PUT", one, first, schemas.CreateResponse)
        again = client.put("/v2/vllm/instances/lim", json={"options": f"--model m --port {free_port()}"})
        assert again.status_code == 409
        _check(served, "PUT", one, again, schemas.ErrorResponse)
        full = client.post("/v2/vllm/instances", json={"options": f"--model m --port {free_port()}"})
        assert full.status_code == 429
        _check(served, "POST", "/v2/vllm/instances", full, schemas.ErrorResponse)
        client.delete("/v2/vllm/instances")
    finally:
        assert not with_limit.stop()


def test_unauthorized_answers_match_the_document(served: dict[str, Any]) -> None:
    secured = LauncherProcess(workload="standin", env={"LAUNCHER_API_TOKEN": "s3cret"})
    try:
        client = secured.client
        _check(served, "GET", "/health", client.get("/health"), schemas.HealthResponse)
        for op in OPERATIONS:
            if not op.secured or op.method != "GET" or "{" in op.path:
                continue
            response = client.get(op.path)
            assert response.status_code == 401, op.path
            shape = schemas.OpenAIError if op.path.startswith("/v1/") else schemas.ErrorResponse
            _check(served, "GET", op.path, response, shape)
        authorized = client.get("/openapi.json", headers={"Authorization": "Bearer s3cret"})
        assert authorized.status_code == 200
    finally:
        assert not secured.stop()


def test_the_cached_document_cannot_be_changed_by_a_caller() -> None:
    first = openapi_document()
    first["paths"].clear()
    assert openapi_document()["paths"], "a caller's change leaked into the cached document"
