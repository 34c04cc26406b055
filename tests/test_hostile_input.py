"""Hostile input against a real launcher (stand-in workload): never a 5xx, always the documented answer.

Two kinds of generated input, bounded so the whole file runs in a couple of minutes on 2 CPUs:

- schema-driven: schemathesis reads the launcher's own ``GET /openapi.json`` and generates valid
  and invalid requests for every operation; every answer must pass its checks (no server error,
  documented status code, content type, headers and body schema);
- targeted hypothesis strategies for what schemas do not reach: create bodies with shell quotes,
  NUL bytes, huge strings, odd environment names, unknown GPUs and random JSON or bytes; random
  ids (``..``, ``/``, ``%2F``, unicode, 200 characters), methods, paths, ``Range`` headers and
  ``detail``/``since`` values, sent over a raw socket so no client library cleans them up.

After every create: a rejected one (4xx) left no instance and no file; an accepted one echoes
the request, becomes ready (or stops for a reason of its own, not because the launcher could not
apply the request), and is deleted, after which the launcher's directories and the temp
directory are as before. Problems are collected rather than raised, so one run reports them all;
the test fails at the end if there is any. The totals are printed, and written to the file named
by ``LAUNCHER_FUZZ_REPORT`` when set (``make bench-fuzz`` records ``benchmarks/results/fuzz.json``).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from pydantic import BaseModel, ValidationError

from forkserver.leftovers import SEGMENT_PREFIXES
from forkserver.protocol import INSTANCE_ID_PATTERN
from launcher.api import schemas
from tests.launcher_process import LauncherProcess, free_port, wait_until

REPORT = os.environ.get("LAUNCHER_FUZZ_REPORT")  # a test run never writes into the repository
TARGET = "fuzz-target"  # an instance that exists during the fuzzing, so ids and Ranges reach real code
EXIT_SETUP_FAILED = 70  # forkserver/child.py: the child could not apply the request before serving
CANARIES = [Path("/tmp/launcher-fuzz-canary"), Path(tempfile.gettempdir()) / "launcher-fuzz-canary"]
INSTANCES = "/v2/vllm/instances"


def _examples(count: int) -> Any:
    return settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # problems are collected, not raised: nothing to shrink
        suppress_health_check=list(HealthCheck),
    )


# ---------------------------------------------------------------- raw HTTP (nothing cleaned up)


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    port: int,
    method: str,
    target: bytes | str,
    headers: dict[str, bytes | str] | None = None,
    body: bytes | None = None,
) -> RawResponse:
    """One HTTP/1.1 request on a new connection, exactly as given (bytes are sent as they are)."""
    target_bytes = target.encode("utf-8", "surrogatepass") if isinstance(target, str) else target
    lines = [method.encode("latin-1") + b" " + target_bytes + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    for name, value in (headers or {}).items():
        raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
        lines.append(name.encode() + b": " + raw)
    if body is not None:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    payload = b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(payload)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed before a complete answer: {data[:200]!r}")
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        answer_headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            answer_headers[name.strip().lower()] = value.strip()
        status = int(status_line.split()[1])
        if method == "HEAD" or status in (204, 304):
            return RawResponse(status, answer_headers, b"")
        if "content-length" in answer_headers:
            length = int(answer_headers["content-length"])
            while len(rest) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
            return RawResponse(status, answer_headers, rest[:length])
        # A stream (the watch endpoint): take what comes within a moment, then hang up.
        sock.settimeout(0.1)
        try:
            while chunk := sock.recv(65536):
                rest += chunk
        except TimeoutError:
            pass
        return RawResponse(status, answer_headers, rest)


# ---------------------------------------------------------------- bookkeeping


@dataclass
class Fuzzer:
    """The launcher under test, the document it serves, and what the run found."""

    launcher: LauncherProcess
    document: dict[str, Any]
    inputs: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: int = 0
    problems: list[str] = field(default_factory=list)
    accepted: int = 0
    # Its own client without keep-alive: after a 500, uvicorn closes the connection it answered on.
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(
            base_url=self.launcher.base_url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)
        )

    @property
    def port(self) -> int:
        return self.launcher.port

    def count(self, prop: str, status: int, what: str) -> None:
        self.inputs[prop] += 1
        self.statuses[status] += 1
        if status >= 500:
            self.server_errors += 1
            self.problem(f"{status} for {what}")

    def control(self, response: httpx.Response, what: str) -> bool:
        """Check an answer to one of the test's own requests; a 5xx there counts as a server error too."""
        if response.status_code < 500:
            return True
        self.server_errors += 1
        self.problem(f"{what} answered {response.status_code}: {response.text[:300]}")
        return False

    def problem(self, text: str) -> None:
        if len(self.problems) < 500:
            self.problems.append(text[:600])

    # --- the launcher's files

    def tree(self) -> set[str]:
        """Every path under the launcher's work directory (its TMPDIR too), plus its kinds of /dev/shm segments."""
        paths = set()
        root = self.launcher.workdir
        for directory, dirs, files in os.walk(root):
            for name in dirs + files:
                paths.add(os.path.relpath(os.path.join(directory, name), root))
        paths |= {f"<shm>/{name}" for name in os.listdir("/dev/shm") if name.startswith(SEGMENT_PREFIXES)}
        return paths

    def ids(self) -> set[str] | None:
        """The instance ids, or None (a problem) when the list cannot be had."""
        response = self.client.get(INSTANCES, params={"detail": "False"})
        if not self.control(response, f"GET {INSTANCES}?detail=False"):
            return None
        full = self.client.get(INSTANCES)  # the detailed list renders every state: it must too
        if self.control(full, f"GET {INSTANCES}") and (problem := _valid(schemas.InstanceList, full.content)):
            self.problem(f"GET {INSTANCES} body invalid: {problem}")
        return set(response.json()["instance_ids"])

    def ensure_target(self) -> None:
        """Recreate the target instance if an input deleted it (DELETE of everything, say)."""
        if self.client.get(f"{INSTANCES}/{TARGET}").status_code == 200:
            return
        options = f"--model target --port {free_port()} --host 127.0.0.1 --spam-lines 20"
        response = self.client.put(f"{INSTANCES}/{TARGET}", json={"options": options})
        assert response.status_code == 201, response.text
        wait_until(lambda: self.client.get(f"{INSTANCES}/{TARGET}").json()["ready"], 20, what="the target ready")

    def documented(self, method: str, path: str) -> set[int]:
        return {int(code) for code in self.document["paths"][path][method.lower()]["responses"]}


def _valid(model: type[BaseModel], body: bytes) -> str | None:
    try:
        model.model_validate_json(body)
    except ValidationError as exc:
        return str(exc).replace("\n", " ")[:300]
    return None


class Guard:
    """Checks around one example: ids and files before, cleanup and comparison after."""

    def __init__(self, fuzz: Fuzzer) -> None:
        self.fuzz = fuzz
        self.ids_before = fuzz.ids()
        self.tree_before = fuzz.tree()
        self.accepted: list[str] = []
        self.target = self._target()

    def _target(self) -> tuple[int, int] | None:
        """The target instance's pid and log size (a rejected create must not touch its log)."""
        response = self.fuzz.client.get(f"{INSTANCES}/{TARGET}")
        if response.status_code != 200:
            return None
        log = self.fuzz.launcher.log_dir / f"{TARGET}.log"
        return int(response.json()["pid"]), log.stat().st_size if log.exists() else -1

    def rejected_create(self, what: str) -> None:
        """A 4xx create: no new instance, no new file."""
        ids_now = self.fuzz.ids()
        if ids_now is not None and self.ids_before is not None and ids_now != self.ids_before:
            self.fuzz.problem(f"rejected create left instances {sorted(ids_now - self.ids_before)}: {what}")
            self.accepted += sorted(ids_now - self.ids_before)
        new = self.fuzz.tree() - self.tree_before
        if new:
            self.fuzz.problem(f"rejected create left files {sorted(new)[:5]}: {what}")

    def accepted_create(self, instance_id: str, what: str) -> None:
        """A 201: only the instance's log (and its private temp dir) appeared."""
        self.accepted.append(instance_id)
        new = self.fuzz.tree() - self.tree_before
        allowed = {"logs", f"logs/{instance_id}.log"}
        outside = {path for path in new if path not in allowed and not path.startswith("run/")}
        if outside:
            self.fuzz.problem(f"create of {instance_id!r} made files outside the log dir {sorted(outside)[:5]}: {what}")

    def finish(self) -> None:
        """Delete what the example created; the directories must be as before."""
        client = self.fuzz.client
        ids_now = self.fuzz.ids()
        if ids_now is None or self.ids_before is None:
            client.delete(INSTANCES)  # the list is broken: start again from nothing
            ids_now = self.ids_before = set()
        for instance_id in {*self.accepted, *(ids_now - self.ids_before - {TARGET})}:
            response = client.delete(f"{INSTANCES}/{instance_id}")
            if response.status_code not in (200, 404):
                self.fuzz.problem(f"DELETE {instance_id!r} answered {response.status_code}: {response.text[:200]}")
        target = self._target()
        if self.target and target and target[0] == self.target[0] and target[1] < self.target[1]:
            self.fuzz.problem(f"the target's log shrank from {self.target[1]} to {target[1]} bytes")
        self.fuzz.ensure_target()
        left = self.fuzz.tree() - self.tree_before
        gone = {path for path in self.tree_before - self.fuzz.tree() if not path.startswith("run/")}
        left = {path for path in left if not path.startswith("run/") or TARGET in path}
        if left:
            self.fuzz.problem(f"files left after deleting the example's instances: {sorted(left)[:5]}")
        if gone - {f"logs/{TARGET}.log"}:
            self.fuzz.problem(f"files removed by the example: {sorted(gone)[:5]}")
        for canary in CANARIES:
            if canary.exists():
                self.fuzz.problem(f"an option or variable ran a shell command: {canary} exists")
                canary.unlink()


@pytest.fixture(scope="module")
def fuzz() -> Iterator[Fuzzer]:
    launcher = LauncherProcess(
        workload="standin",
        env={
            "LAUNCHER_MAX_INSTANCES": "4",
            "LAUNCHER_STOP_TIMEOUT": "2",
            "LAUNCHER_MOCK_GPUS": "1",
            "LAUNCHER_MOCK_GPU_COUNT": "2",
        },
    )
    started = time.monotonic()
    try:
        document = launcher.client.get("/openapi.json").json()
        fuzzer = Fuzzer(launcher, document)
        fuzzer.ensure_target()
        yield fuzzer
        fuzzer.client.delete(INSTANCES)
        fuzzer.client.close()
        summary = {
            "inputs": sum(fuzzer.inputs.values()),
            "server_errors": fuzzer.server_errors,
            "problems": len(fuzzer.problems),
            "accepted_creates": fuzzer.accepted,
            "inputs_by_property": dict(sorted(fuzzer.inputs.items())),
            "statuses": {str(code): count for code, count in sorted(fuzzer.statuses.items())},
            "seconds": round(time.monotonic() - started, 1),
            "workload": "standin",
            "schemathesis": schemathesis.__version__ if hasattr(schemathesis, "__version__") else "",
        }
        if REPORT and len(fuzzer.inputs) == 5:  # a full run (not a -k selection) is the one to record
            Path(REPORT).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nfuzz: {summary['inputs']} inputs, {summary['server_errors']} server errors (5xx), "
              f"{summary['problems']} problems, {summary['accepted_creates']} accepted creates")  # fmt: skip
    finally:
        leftovers = launcher.stop()
    assert not leftovers, f"processes outlived the launcher: {leftovers}"
    for canary in CANARIES:
        assert not canary.exists()


def _report(fuzz: Fuzzer, since: int) -> None:
    found = fuzz.problems[since:]
    assert not found, f"{len(found)} problem(s):\n" + "\n".join(sorted(set(found))[:40])


# ---------------------------------------------------------------- schema-driven (schemathesis)

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
]
PATH_OPERATIONS = ("/v2/vllm/instances/{instance_id}", "/v2/vllm/instances/{instance_id}/log")


def _call_watch(fuzz: Fuzzer, case: schemathesis.Case) -> None:
    """The watch stream never ends by itself: read what comes within a moment, check every line."""
    kwargs = case.as_transport_kwargs(base_url=fuzz.launcher.base_url)
    label = f"GET watch params={kwargs.get('params')!r:.200}"
    try:
        with requests.request(**kwargs, stream=True, timeout=(10, 0.2)) as response:
            fuzz.count("schemathesis", response.status_code, label)
            if response.status_code not in fuzz.documented("GET", "/v2/vllm/instances/watch"):
                fuzz.problem(f"undocumented {response.status_code} for {label}")
            if response.status_code != 200:
                if problem := _valid(schemas.ErrorResponse, response.content):
                    fuzz.problem(f"{response.status_code} body not an error: {problem}: {label}")
                return
            if not response.headers.get("content-type", "").startswith("application/x-ndjson"):
                fuzz.problem(f"watch content type {response.headers.get('content-type')}: {label}")
            try:
                for line in response.iter_lines():
                    if line and (problem := _valid(schemas.WatchEvent, line)):
                        fuzz.problem(f"watch event {line[:200]!r} invalid: {problem}")
            except requests.RequestException:
                pass  # the read timeout: the stream is open and idle, as it should be
    except requests.RequestException as exc:
        fuzz.problem(f"transport error {exc!r:.200} for {label}")


def _schemathesis_example(fuzz: Fuzzer, case: schemathesis.Case) -> None:
    operation = case.operation
    if operation.path == "/v2/vllm/instances/watch":
        _call_watch(fuzz, case)
        return
    creates = operation.method.upper() in ("POST", "PUT")
    guard = Guard(fuzz) if creates else None
    label = case.as_curl_command(base_url=fuzz.launcher.base_url)[:400]
    try:
        response = case.call(base_url=fuzz.launcher.base_url, timeout=30)
    except requests.RequestException as exc:
        fuzz.problem(f"transport error {exc!r:.200} for {label}")
        return
    fuzz.count("schemathesis", response.status_code, label)
    try:
        case.validate_response(response, checks=CHECKS)
    except Exception as exc:  # noqa: BLE001 - schemathesis raises its own failure types; all are findings
        fuzz.problem(f"{type(exc).__name__}: {str(exc)[:300]} for {label}")
    if guard is not None:
        if response.status_code == 201:
            fuzz.accepted += 1
            guard.accepted_create(response.json()["instance_id"], label)
        elif response.status_code < 500:
            guard.rejected_create(label)
        guard.finish()
    elif operation.method.upper() == "DELETE":
        fuzz.ensure_target()


def test_schemathesis_every_operation(fuzz: Fuzzer) -> None:
    """schemathesis, from the served document: valid and invalid inputs for every operation."""
    since = len(fuzz.problems)
    schema = schemathesis.openapi.from_url(f"{fuzz.launcher.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    # schemathesis leaves out the document's own URL; the raw tests below send requests there.
    assert {f"{op.method.upper()} {op.path}" for op in operations} | {"GET /openapi.json"} == {
        f"{method.upper()} {path}" for path, item in fuzz.document["paths"].items() for method in item
    }
    for operation in operations:
        has_input = bool(operation.path_parameters or operation.query or operation.headers or operation.body)
        strategies = [operation.as_strategy(schemathesis.GenerationMode.POSITIVE)]
        if has_input:
            strategies.append(operation.as_strategy(schemathesis.GenerationMode.NEGATIVE))
        if operation.path in PATH_OPERATIONS:
            # Also aim at an instance that exists, so Range and the handlers' own code are reached.
            strategies.append(
                operation.as_strategy(schemathesis.GenerationMode.POSITIVE, path_parameters={"instance_id": TARGET})
            )
            strategies.append(
                operation.as_strategy(schemathesis.GenerationMode.NEGATIVE, path_parameters={"instance_id": TARGET})
            )

        @_examples(100 if has_input else 3)
        @given(case=st.one_of(*strategies))
        def run(case: schemathesis.Case) -> None:
            _schemathesis_example(fuzz, case)

        try:
            run()
        except Unsatisfiable:
            pass  # an operation with a single possible request: it was sent
    _report(fuzz, since)


# ---------------------------------------------------------------- targeted strategies

HOSTILE_WORDS = [
    "'", '"', "\\", "'unterminated", '"unterminated', "$(touch /tmp/launcher-fuzz-canary)",
    f"$(touch {CANARIES[1]})", "`touch /tmp/launcher-fuzz-canary`", "; touch /tmp/launcher-fuzz-canary",
    "| cat /etc/passwd", "&&", "${HOME}", "$PATH", "~", "*", "../../etc/passwd", "/dev/null", "--", "-", "",
    " ", "\t", "\n", "\x00", "a\x00b", "\u202e", "\ud800", "\U0001f600", "é", "\r\n", "%00", "%2F", "x" * 5000,
]  # fmt: skip
HOSTILE_PORTS = [
    "0", "-1", "65535", "65536", "70000", "99999999999999999999", "9" * 5000, "1e3", "0x50", " 8080", "８０８０",
    "80.0", "", "$PORT", "NaN",
]  # fmt: skip
HOSTILE_ENV_KEYS = [
    "", "A=B", "=", "A\x00", "\x00", "PATH", "LD_PRELOAD", "PYTHONPATH", "TMPDIR", "HOME", "CUDA_VISIBLE_DEVICES",
    "VLLM_LOGGING_LEVEL", "x" * 1000, "é", "a b", "$(x)", "\ud800",
]  # fmt: skip
HOSTILE_IDS = [
    "..", ".", "/", "%2F", "%2e%2e", "..%2F..%2Fetc", "a/b", "a%2Fb", "watch", "-a", "_a", ".a", "a" * 128, "a" * 129,
    "a" * 200, "é", "日本", "\U0001f600", "a b", "a%20b", "a%00b", "%", "%zz", "a?b", "a#b", "a;b", "~", TARGET,
]  # fmt: skip
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=10), inner, max_size=4), max_leaves=12)  # fmt: skip
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(HOSTILE_WORDS))


SAFE_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=30)
SAFE_MODEL = st.from_regex(r"\A[a-z0-9][a-z0-9/._-]{0,29}\Z")
SAFE_PORT = st.one_of(st.none(), st.integers(20000, 60000).map(str))
SAFE_ENV_KEY = st.from_regex(r"\A[A-Z_][A-Z0-9_]{0,15}\Z").filter(lambda key: key not in ("TMPDIR", "PATH", "HOME"))
VALID_EXTRAS = st.lists(st.sampled_from([("--spam-lines", "3"), ("--print-env", "PATH"), ("--startup-delay", "0")]),
                        max_size=2).map(lambda pairs: [token for pair in pairs for token in pair])  # fmt: skip
HOSTILE_EXTRAS = st.lists(st.sampled_from(["--spam-lines", "3", "--print-env", "PATH", "--nope", "x", "-"]), max_size=3)
HOSTILITY = ["none", "options", "model", "port", "env_key", "env_value", "gpus", "annotations", "shape", "all"]


@st.composite
def create_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A create body with one hostile part (or none, or all), so that many are accepted.

    An accepted body is the interesting case: the launcher took it, so it must be able to run it,
    report it and delete it.
    """
    hostile = draw(st.sampled_from(HOSTILITY))

    def choose(part: str, safe: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return bad if hostile in (part, "all") else safe

    def pick(part: str, safe: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
        return draw(choose(part, safe, bad))

    tokens = ["--model", pick("model", SAFE_MODEL, TEXT), "--host", "127.0.0.1"]
    port = pick("port", SAFE_PORT, st.sampled_from(HOSTILE_PORTS))
    if port is not None:
        tokens += ["--port", port]
    tokens += pick("options", VALID_EXTRAS, HOSTILE_EXTRAS)
    options = shlex.join(tokens) if draw(st.booleans()) else " ".join(tokens)
    if hostile in ("options", "all"):
        where = draw(st.integers(0, 2))
        options = options + " " + draw(TEXT) if where == 0 else draw(TEXT) + " " + options if where == 1 else draw(TEXT)
    body: dict[str, Any] = {"options": options}
    if draw(st.booleans()) or hostile in ("env_key", "env_value"):
        body["env_vars"] = draw(st.dictionaries(
            choose("env_key", SAFE_ENV_KEY, st.one_of(st.text(max_size=20), st.sampled_from(HOSTILE_ENV_KEYS))),
            choose("env_value", SAFE_TEXT, TEXT), min_size=1 if hostile.startswith("env") else 0, max_size=3,
        ))  # fmt: skip
    if draw(st.booleans()) or hostile == "gpus":
        body["gpu_uuids"] = pick(
            "gpus",
            st.lists(st.sampled_from(["GPU-0", "GPU-1"]), max_size=2, unique=True),
            st.lists(
                st.one_of(st.sampled_from(["GPU-0", "GPU-2", "", "gpu-0", "\ud800"]), TEXT), min_size=1, max_size=3
            ),
        )
    if draw(st.booleans()) or hostile == "annotations":
        body["annotations"] = pick(
            "annotations",
            st.dictionaries(SAFE_TEXT, SAFE_TEXT, max_size=3),
            st.dictionaries(TEXT, TEXT, min_size=1, max_size=3),
        )
    if hostile in ("shape", "all"):  # wrong shapes: a field of another type, an unknown field, a missing field
        mutation = draw(st.sampled_from(["type", "unknown", "missing"]))
        if mutation == "type":
            body[draw(st.sampled_from(["options", "env_vars", "gpu_uuids", "annotations"]))] = draw(JSON_VALUES)
        elif mutation == "unknown":
            body[draw(st.text(max_size=10))] = draw(JSON_VALUES)
        else:
            body.pop("options")
    return body


def _encode(value: Any, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


_BODY = st.tuples(create_bodies(), st.booleans()).map(lambda item: ("body", item[0], _encode(*item)))
CREATE_PAYLOADS = st.one_of(
    _BODY,
    _BODY,
    _BODY,
    st.tuples(JSON_VALUES, st.booleans()).map(lambda item: ("json", item[0], _encode(*item))),
    st.binary(max_size=200).map(lambda raw: ("bytes", None, raw)),
    st.sampled_from([b"", b" ", b"{", b"null", b"[]", b'{"options": "--model m"}' + b" " * 70000, b"\xff\xfe"]).map(
        lambda raw: ("bytes", None, raw)
    ),
)
CONTENT_TYPES = st.one_of(
    st.just("application/json"),
    st.just("application/json"),
    st.just("application/json"),
    st.sampled_from([
        "application/json; charset=utf-8", "application/merge-patch+json", "text/plain",
        "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "", "APPLICATION/JSON",
        "application/jsonx", "application/json; charset=latin-1", "*/*",
    ]),
)  # fmt: skip
CREATE_TARGETS = st.one_of(
    st.just(("POST", INSTANCES, None)),
    st.from_regex(rf"\A{INSTANCE_ID_PATTERN}\Z").map(lambda name: ("PUT", f"{INSTANCES}/{quote(name)}", name)),
    st.sampled_from(HOSTILE_IDS).map(lambda name: ("PUT", f"{INSTANCES}/{quote(name, safe='%/')}", name)),
)


def _check_accepted(fuzz: Fuzzer, guard: Guard, sent: dict[str, Any], answer: RawResponse, what: str) -> None:
    created = answer.json()
    instance_id = created["instance_id"]
    guard.accepted_create(instance_id, what)
    if not 1 <= created["port"] <= 65535:
        fuzz.problem(f"accepted a create with port {created['port']} (nothing can serve there): {what}")

    def settled() -> dict[str, Any] | None:
        response = fuzz.client.get(f"{INSTANCES}/{instance_id}")
        if response.status_code != 200:
            return {"answer": response}
        state: dict[str, Any] = response.json()
        return state if state["ready"] or state["status"] == "stopped" else None

    try:
        state = wait_until(settled, 3, 0.05, "ready or stopped")
    except AssertionError:
        fuzz.problem(f"accepted instance neither ready nor stopped after 3 s: {what}")
        return
    if "answer" in state:
        fuzz.control(state["answer"], f"GET of the accepted instance of {what}")
        return
    if problem := _valid(schemas.InstanceState, json.dumps(state).encode()):
        fuzz.problem(f"state invalid: {problem}: {what}")
    if state["status"] == "stopped" and state.get("exit_code") == EXIT_SETUP_FAILED:
        log = fuzz.client.get(f"{INSTANCES}/{instance_id}/log").content.decode(errors="replace")
        reason = log.strip().splitlines()[-1] if log.strip() else "?"
        fuzz.problem(f"accepted (201) but the instance could not be set up ({reason}); should be a 4xx: {what}")
    expected = dict(sent)
    if sent.get("gpu_uuids") is not None:  # as FMA's launcher: env_vars echoed with what the instance got
        devices = ",".join(uuid.removeprefix("GPU-") for uuid in sent["gpu_uuids"])
        expected["env_vars"] = {**(sent.get("env_vars") or {}), "CUDA_VISIBLE_DEVICES": devices}
    for name in ("options", "env_vars", "gpu_uuids", "annotations"):
        if state.get(name) != expected.get(name):
            fuzz.problem(f"state echoes {name}={state.get(name)!r:.100}, sent {sent.get(name)!r:.100}: {what}")


def _create_example(body: dict[str, Any]) -> Any:
    """An explicit example for the create property: PUT of ``body`` as JSON (non-ASCII escaped)."""
    return example(
        target=("PUT", f"{INSTANCES}/explicit", "explicit"),
        payload=("body", body, _encode(body, True)),
        content_type="application/json",
    )


def test_hostile_create_requests(fuzz: Fuzzer) -> None:
    """Create bodies with hostile values, random JSON and bytes, odd content types and ids."""
    since = len(fuzz.problems)

    @_examples(400)
    @given(target=CREATE_TARGETS, payload=CREATE_PAYLOADS, content_type=CONTENT_TYPES)
    @_create_example({"options": "--model m --host 127.0.0.1 --port 70000"})  # out of range
    @_create_example({"options": "--model m --host 127.0.0.1 --port -1"})
    @_create_example({"options": "--model m --host 127.0.0.1 --port 0"})  # nothing can be probed there
    @_create_example({"options": "--model m --host 127.0.0.1", "env_vars": {"A=B": "1"}})  # no such name
    @_create_example({"options": "--model m --host 127.0.0.1", "env_vars": {"A": "a\x00b"}})
    @_create_example({"options": "--model m --host 127.0.0.1", "annotations": {"a": "\ud800"}})  # a lone surrogate
    @_create_example({"options": "--model m --host 127.0.0.1", "gpu_uuids": ["\ud800"]})
    @_create_example({"options": "--model 'm' --host 127.0.0.1 $(touch /tmp/launcher-fuzz-canary)"})
    def run(target: tuple[str, str, str | None], payload: tuple[str, Any, bytes], content_type: str) -> None:
        method, path, _ = target
        kind, sent, raw = payload
        what = f"{method} {path[:80]} content-type={content_type!r} body={raw[:300]!r}"
        guard = Guard(fuzz)
        headers = {"Content-Type": content_type} if content_type else {}
        try:
            answer = raw_request(fuzz.port, method, path, headers, raw)
        except (OSError, ValueError) as exc:
            fuzz.problem(f"transport error {exc!r:.200}: {what}")
            guard.finish()
            return
        fuzz.count("create", answer.status, what)
        template = INSTANCES if method == "POST" else "/v2/vllm/instances/{instance_id}"
        if answer.status < 500 and answer.status not in fuzz.documented(method, template) | {307, 404, 405}:
            fuzz.problem(f"undocumented status {answer.status}: {what}")
        if answer.status == 201:
            fuzz.accepted += 1
            if problem := _valid(schemas.CreateResponse, answer.body):
                fuzz.problem(f"201 body {answer.body[:200]!r}: {problem}")
            else:
                _check_accepted(fuzz, guard, sent if kind == "body" else {}, answer, what)
        else:
            if answer.headers.get("content-type") == "application/json" and (
                problem := _valid(schemas.ErrorResponse, answer.body)
            ):
                fuzz.problem(f"{answer.status} body {answer.body[:200]!r} is not an error body: {problem}")
            if answer.status < 500:
                guard.rejected_create(what)
        guard.finish()

    run()
    _report(fuzz, since)


METHODS = st.one_of(
    st.sampled_from(["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT"]),
    st.from_regex(r"\A[A-Z]{1,10}\Z"),
)
IDS = st.one_of(
    st.sampled_from(HOSTILE_IDS),
    st.text(min_size=1, max_size=200),
    st.from_regex(rf"\A{INSTANCE_ID_PATTERN}\Z"),
)
QUERY_VALUES = st.one_of(
    st.text(max_size=30),
    st.integers(-(10**30), 10**30).map(str),
    st.integers(0, 20).map(str),
    st.sampled_from([
        "²", "١٢", "٣", "9" * 4301, "9" * 5000, "-1", "+1", " 1", "1.0", "0x1", "", "True", "FALSE", " yes ",
        "0", "00", "1" * 30, "\x00", "%", "%zz", "&", "=",
    ]),
)  # fmt: skip


@st.composite
def request_targets(draw: st.DrawFn) -> str:
    """A request target: an API path with a random id or extra segments, maybe a query."""
    instance_id = draw(IDS)
    encoded = draw(st.sampled_from([quote(instance_id, safe=""), quote(instance_id, safe="/%?#"), instance_id]))
    path = draw(st.sampled_from([
        f"{INSTANCES}/{encoded}", f"{INSTANCES}/{encoded}/log", f"{INSTANCES}/{encoded}/log/x", INSTANCES,
        f"{INSTANCES}/watch", "/v2/vllm/gpus", "/", "/health", "/openapi.json", "/metrics", f"/{encoded}",
        f"{INSTANCES}/", f"{INSTANCES}//", f"/v2/vllm/{encoded}", f"{INSTANCES}/../../health",
    ]))  # fmt: skip
    if draw(st.booleans()):
        name = draw(st.sampled_from(["detail", "since", "detail", "since", "x"]))
        value = draw(QUERY_VALUES)
        path += "?" + quote(name) + "=" + draw(st.sampled_from([quote(value, safe=""), value]))
    return path


def _check_generic(fuzz: Fuzzer, answer: RawResponse, what: str) -> None:
    is_json = answer.headers.get("content-type") == "application/json"
    if answer.status >= 400 and is_json and answer.body and (problem := _valid(schemas.ErrorResponse, answer.body)):
        fuzz.problem(f"{answer.status} body {answer.body[:200]!r} is not an error body: {problem}: {what}")


BODIES = st.one_of(st.none(), st.binary(max_size=50), JSON_VALUES.map(lambda value: _encode(value, True)))


def test_hostile_methods_paths_and_queries(fuzz: Fuzzer) -> None:
    """Random methods on random paths (ids with '..', '/', '%2F', unicode, 200 chars) and queries."""
    since = len(fuzz.problems)
    documented = {
        int(code) for item in fuzz.document["paths"].values() for op in item.values() for code in op["responses"]
    }

    @_examples(400)
    @given(method=METHODS, target=request_targets(), body=BODIES)
    def run(method: str, target: str, body: bytes | None) -> None:
        what = f"{method} {target[:200]!r} body={body[:100] if body else body!r}"
        guard = Guard(fuzz) if method in ("PUT", "POST") else None
        try:
            answer = raw_request(fuzz.port, method, target, {"Content-Type": "application/json"} if body else {}, body)
        except (OSError, ValueError) as exc:
            fuzz.problem(f"transport error {exc!r:.200}: {what}")
            return
        fuzz.count("paths", answer.status, what)
        # 307: Starlette redirects '/path/' to '/path' (see the report on trailing slashes).
        if answer.status < 500 and answer.status not in documented | {307, 404, 405}:
            fuzz.problem(f"status {answer.status} is in no documented answer: {what}")
        _check_generic(fuzz, answer, what)
        if guard is not None:
            if answer.status == 201:
                fuzz.accepted += 1
                guard.accepted_create(answer.json()["instance_id"], what)
            guard.finish()
        elif method == "DELETE":
            fuzz.ensure_target()

    run()
    _report(fuzz, since)


@st.composite
def query_targets(draw: st.DrawFn) -> str:
    """The list or watch endpoint with a random ``detail`` or ``since`` value, encoded or raw."""
    path = draw(st.sampled_from([INSTANCES, f"{INSTANCES}/watch"]))
    name = draw(st.sampled_from(["detail", "since"]))
    value = draw(st.one_of(QUERY_VALUES, st.sampled_from(["²", "١٢", "9" * 4301, "9" * 5000, "0", "1", "yes"])))
    encoded = draw(st.sampled_from([quote(value, safe=""), quote(value, safe=""), value]))
    extra = draw(st.sampled_from(["", "", "", "", "", f"&{name}=1", f"&{name}", f"&{name}=x"]))
    return f"{path}?{quote(name)}={encoded}{extra}"


def test_hostile_query_values(fuzz: Fuzzer) -> None:
    """``detail`` and ``since``: documented answers only (the watch stream is read for a moment)."""
    since = len(fuzz.problems)

    @_examples(200)
    @given(target=query_targets())
    @example(target=f"{INSTANCES}/watch?since=%C2%B2")  # a digit to str.isdigit, not to int()
    @example(target=f"{INSTANCES}/watch?since={'9' * 4301}")  # more digits than int() converts
    @example(target=f"{INSTANCES}?detail={'x' * 5000}")
    def run(target: str) -> None:
        what = f"GET {target[:200]!r}"
        try:
            answer = raw_request(fuzz.port, "GET", target)
        except (OSError, ValueError) as exc:
            fuzz.problem(f"transport error {exc!r:.200}: {what}")
            return
        fuzz.count("query", answer.status, what)
        path = target.split("?")[0]
        if answer.status < 500 and answer.status not in fuzz.documented("GET", path):
            fuzz.problem(f"undocumented status {answer.status}: {what}")
        if answer.status == 200 and path == INSTANCES:
            model = schemas.InstanceList if b'"instances"' in answer.body else schemas.InstanceIdList
            if problem := _valid(model, answer.body):
                fuzz.problem(f"list body invalid: {problem}: {what}")
        _check_generic(fuzz, answer, what)

    run()
    _report(fuzz, since)


RANGES = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=40),
    st.builds(
        lambda unit, start, end: f"{unit}={start}-{end}",
        st.sampled_from(["bytes", "bytes", "Bytes", "items", " bytes"]),
        st.one_of(st.integers(0, 10**4).map(str), st.sampled_from(["", "-1", "9" * 4400, "1" * 30, "²", "١", " 1"])),
        st.one_of(st.integers(0, 10**4).map(str), st.sampled_from(["", "-1", "9" * 4400, "1" * 30, "0,1-2", "²"])),
    ),
    st.sampled_from(["bytes=-5", "bytes=0-1,2-3", "bytes=", "bytes=-", "bytes=5-1", "bytes=0-0", "bytes=0-", "*"]),
)


def test_hostile_range_headers(fuzz: Fuzzer) -> None:
    """Random Range headers on an existing instance's log: 200, 206, 400 or 416, and nothing else."""
    since = len(fuzz.problems)
    fuzz.ensure_target()
    log_path = f"{INSTANCES}/{TARGET}/log"
    whole = fuzz.client.get(log_path).content

    @_examples(200)
    @given(header=RANGES)
    @example(header="bytes=0-" + "9" * 4400)
    @example(header="bytes=" + "9" * 4400 + "-")
    def run(header: str) -> None:
        what = f"GET {log_path} Range: {header[:100]!r}"
        try:
            answer = raw_request(fuzz.port, "GET", log_path, {"Range": header})
        except (OSError, ValueError) as exc:
            fuzz.problem(f"transport error {exc!r:.200}: {what}")
            return
        fuzz.count("range", answer.status, what)
        if answer.status < 500 and answer.status not in {200, 206, 400, 416}:
            fuzz.problem(f"status {answer.status}: {what}")
        if answer.status == 206:
            first, _, _ = answer.headers.get("content-range", "").removeprefix("bytes ").partition("-")
            if not first.isdigit() or whole[int(first) : int(first) + len(answer.body)] != answer.body:
                fuzz.problem(f"206 with Content-Range {answer.headers.get('content-range')!r} and other bytes: {what}")
        if answer.status == 416 and not answer.headers.get("content-range", "").startswith("bytes */"):
            fuzz.problem(f"416 without Content-Range bytes */N: {what}")
        _check_generic(fuzz, answer, what)

    run()
    _report(fuzz, since)


def test_totals_were_reported(fuzz: Fuzzer) -> None:
    """Runs last in this file: the run was not trivially small and found no 5xx."""
    total = sum(fuzz.inputs.values())
    assert total >= 500, fuzz.inputs
    assert fuzz.server_errors == 0, f"{fuzz.server_errors} server errors; see the failures above"
