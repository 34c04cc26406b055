"""A small typed client for the launcher's REST API.

Only the standard library and httpx: importable on any machine, without torch or vLLM.

Why this module is long: it is one class, :class:`LauncherClient`, whose methods mirror the
API's endpoints one for one, with the typed errors and the event stream they return; split up,
the client a user reads about would be scattered over files.

    with LauncherClient("http://node:8001") as launcher:
        launcher.create("--model facebook/opt-125m --port 8000", instance_id="opt")
        state = launcher.wait_ready("opt", timeout=300)
        for chunk in launcher.follow_log("opt"):
            sys.stdout.buffer.write(chunk)

Every non-2xx answer raises :class:`LauncherAPIError` (:class:`UnauthorizedError` for 401,
:class:`NotFoundError` for 404, :class:`ConflictError` for 409, :class:`GoneError` for 410); a
launcher that cannot be reached raises :class:`LauncherConnectionError`. All of them derive
from :class:`LauncherClientError`.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypedDict, cast
from urllib.parse import quote

import httpx

from launcher import __version__

DEFAULT_URL = "http://localhost:8001"
INSTANCES = "/v2/vllm/instances"
MODELS = "/v2/vllm/models"

JSONDict = dict[str, Any]


class InstanceState(TypedDict, total=False):
    """An instance's state as ``GET /v2/vllm/instances/{id}`` reports it (fields may grow)."""

    status: str  # "running" or "stopped"
    instance_id: str
    options: str
    env_vars: dict[str, str]
    gpu_uuids: list[str]
    annotations: dict[str, str]
    pid: int
    port: int
    model: str
    created_at: float
    ready: bool
    ready_at: float | None
    start_seconds: float | None
    revision: int
    exit_code: int | None
    stopped_at: float
    stop_reason: str


class WatchEvent(TypedDict):
    """One line of the watch stream: CREATED, READY, STOPPED, DELETED, or ERROR (stream ends)."""

    type: str
    object: JSONDict


# ---------------------------------------------------------------------------------- errors


class LauncherClientError(Exception):
    """Base class of every error this client raises."""


class LauncherConnectionError(LauncherClientError):
    """The launcher could not be reached, or the connection broke or timed out."""

    def __init__(self, base_url: str, cause: Exception) -> None:
        super().__init__(
            f"cannot reach the launcher at {base_url}: {cause or type(cause).__name__} "
            "(another address: --url or LAUNCHER_URL)"
        )
        self.base_url = base_url
        self.cause = cause


class LauncherAPIError(LauncherClientError):
    """The launcher answered with a non-2xx status; ``detail`` is its explanation."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class UnauthorizedError(LauncherAPIError):
    """401: the launcher wants ``Authorization: Bearer <token>`` and got none or a wrong one."""


class NotFoundError(LauncherAPIError):
    """404: no such instance."""


class ConflictError(LauncherAPIError):
    """409: the instance id exists already, or the port is taken."""


class GoneError(LauncherAPIError):
    """410: a watch ``since`` revision older than the launcher keeps."""


class InstanceStoppedError(LauncherClientError):
    """The instance stopped (or was deleted) before it became ready."""

    def __init__(self, instance_id: str, state: InstanceState | None) -> None:
        self.instance_id = instance_id
        self.state = state
        self.exit_code = state.get("exit_code") if state else None
        if state is None:
            message = f"instance {instance_id!r} was deleted before it became ready"
        else:
            reason = f" ({state['stop_reason']})" if state.get("stop_reason") else ""
            message = f"instance {instance_id!r} stopped with exit code {self.exit_code} before it became ready{reason}"
        super().__init__(message)


class WaitTimeoutError(LauncherClientError, TimeoutError):
    """The instance was still starting when the wait's timeout ran out."""

    def __init__(self, instance_id: str, timeout: float) -> None:
        super().__init__(f"instance {instance_id!r} was not ready after {timeout:g}s")
        self.instance_id = instance_id
        self.timeout = timeout


_ERRORS: dict[int, type[LauncherAPIError]] = {
    401: UnauthorizedError,
    404: NotFoundError,
    409: ConflictError,
    410: GoneError,
}


def error_from_response(response: httpx.Response) -> LauncherAPIError:
    """The exception for a non-2xx ``response``, with the ``detail`` of its JSON body."""
    detail = ""
    try:
        body = json.loads(response.read() or b"null")
        if isinstance(body, dict) and body.get("detail") is not None:
            detail = str(body["detail"])
    except ValueError:
        detail = response.text.strip()[:500]
    return _ERRORS.get(response.status_code, LauncherAPIError)(
        response.status_code, detail or response.reason_phrase or "error"
    )


# ---------------------------------------------------------------------------------- watch


class EventStream:
    """The watch stream: an iterator of events that holds one HTTP connection until closed.

    Iterating ends when the launcher ends the stream (after an ERROR event, or at shutdown).
    Close it (or use it as a context manager) to stop watching early.
    """

    def __init__(self, response: httpx.Response, base_url: str) -> None:
        self._response = response
        self._lines = response.iter_lines()
        self._base_url = base_url

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> WatchEvent:
        while True:
            try:
                line = next(self._lines)
            except StopIteration:
                self.close()
                raise
            except httpx.TransportError as exc:
                self.close()
                raise LauncherConnectionError(self._base_url, exc) from exc
            if line.strip():
                return cast(WatchEvent, json.loads(line))

    def close(self) -> None:
        """Stop watching and release the connection."""
        self._response.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------- client


def normalize_url(url: str) -> str:
    """``url`` with a scheme (``http://`` if none) and no trailing slash."""
    url = url.strip().rstrip("/")
    return url if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) else f"http://{url}"


def _path(instance_id: str, suffix: str = "") -> str:
    if not instance_id:
        raise ValueError("instance_id must not be empty")
    # Quoted: an id never contains '/', but user input might, and must not reach another route.
    return f"{INSTANCES}/{quote(instance_id, safe='')}{suffix}"


def _model_path(name: str, suffix: str = "") -> str:
    if not name:
        raise ValueError("a model name must not be empty")
    return f"{MODELS}/{quote(name, safe='')}{suffix}"


def _content_range_total(header: str | None) -> int | None:
    """The total of ``Content-Range: bytes S-E/TOTAL`` or ``bytes */TOTAL``."""
    match = re.search(r"/(\d+)\s*$", header or "")
    return int(match.group(1)) if match else None


class LauncherClient:
    """Synchronous client of one launcher. Thread-safe as httpx.Client is; close it when done."""

    def __init__(self, base_url: str | None = None, *, token: str | None = None, timeout: float = 30.0) -> None:
        """Talk to the launcher at ``base_url``; ``token`` is sent as ``Authorization: Bearer``.

        As ``launcherctl``: ``base_url`` defaults to ``$LAUNCHER_URL``, then ``http://localhost:8001``;
        ``token`` to ``$LAUNCHER_API_TOKEN`` (``token=""`` sends none).
        """
        base_url = base_url or os.environ.get("LAUNCHER_URL") or DEFAULT_URL
        if token is None:
            token = os.environ.get("LAUNCHER_API_TOKEN") or None
        self.base_url = normalize_url(base_url)
        self.timeout = timeout
        headers = {"User-Agent": f"launcher-client/{__version__}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    # -------------------------------------------------------------- plumbing

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; transport failures become :class:`LauncherConnectionError`."""
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise LauncherConnectionError(self.base_url, exc) from exc

    def _json(self, method: str, path: str, **kwargs: Any) -> JSONDict:
        response = self._send(method, path, **kwargs)
        if not response.is_success:
            raise error_from_response(response)
        return cast(JSONDict, response.json())

    # -------------------------------------------------------------- service

    def info(self) -> JSONDict:
        """``GET /``: the service's name, version and endpoints."""
        return self._json("GET", "/")

    def health(self) -> JSONDict:
        """``GET /health``: ``{"status": "OK"}``; a 503 (forkserver not ready) raises."""
        return self._json("GET", "/health")

    def gpus(self) -> JSONDict:
        """``GET /v2/vllm/gpus``: ``{"gpus": [{"index", "uuid", "name", "memory_mib", "instances"}], ...}``."""
        return self._json("GET", "/v2/vllm/gpus")

    # -------------------------------------------------------------- instances

    def create(
        self,
        options: str,
        *,
        instance_id: str | None = None,
        env_vars: Mapping[str, str] | None = None,
        gpu_uuids: Sequence[str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> JSONDict:
        """Create an instance running ``options`` (POST without id, PUT with it).

        Returns ``{"status": "started", "instance_id", "pid", "port", "model"}`` as soon as the
        instance is forked; use :meth:`wait_ready` to wait until it serves.
        """
        body: JSONDict = {"options": options}
        if env_vars is not None:
            body["env_vars"] = dict(env_vars)
        if gpu_uuids is not None:
            body["gpu_uuids"] = builtins.list(gpu_uuids)
        if annotations is not None:
            body["annotations"] = dict(annotations)
        if instance_id is None:
            return self._json("POST", INSTANCES, json=body)
        return self._json("PUT", _path(instance_id), json=body)

    def get(self, instance_id: str) -> InstanceState:
        """One instance's state; :class:`NotFoundError` if unknown."""
        if instance_id == "watch":
            # GET .../instances/watch is the watch stream, and "watch" can never be an id.
            raise NotFoundError(404, "instance 'watch' not found ('watch' is a reserved word)")
        return cast(InstanceState, self._json("GET", _path(instance_id)))

    def list(self, detail: bool = True) -> JSONDict:
        """All instances: ``{"instances": [state...], ...}``, or ``{"instance_ids", "count"}`` without detail."""
        return self._json("GET", INSTANCES, params={"detail": "True" if detail else "False"})

    def delete(self, instance_id: str) -> JSONDict:
        """Stop and delete one instance; answers once no process of it is left."""
        return self._json("DELETE", _path(instance_id))

    def delete_all(self) -> JSONDict:
        """Stop and delete every instance: ``{"stopped_instances": [...], "total_stopped"}``."""
        return self._json("DELETE", INSTANCES)

    # -------------------------------------------------------------- front-door models

    def models(self) -> JSONDict:
        """``GET /v2/vllm/models``: ``{"idle_timeout", "models": [profile and state...], "count"}``."""
        return self._json("GET", MODELS)

    def model(self, name: str) -> JSONDict:
        """One model profile (by name or alias) with its state; :class:`NotFoundError` if unknown."""
        return self._json("GET", _model_path(name))

    def put_model(
        self,
        name: str,
        options: str,
        *,
        aliases: Sequence[str] = (),
        env_vars: Mapping[str, str] | None = None,
        gpu_uuids: Sequence[str] | None = None,
        annotations: Mapping[str, str] | None = None,
        idle_timeout: float | None = None,
        preload: bool = False,
        share_gpu: bool = False,
    ) -> JSONDict:
        """Add or replace the profile ``name``: the front door starts it on its first request."""
        body: JSONDict = {"options": options, "aliases": builtins.list(aliases), "preload": preload,
                          "share_gpu": share_gpu}  # fmt: skip
        for key, value in (("env_vars", env_vars), ("annotations", annotations)):
            if value is not None:
                body[key] = dict(value)
        if gpu_uuids is not None:
            body["gpu_uuids"] = builtins.list(gpu_uuids)
        if idle_timeout is not None:
            body["idle_timeout"] = idle_timeout
        return self._json("PUT", _model_path(name), json=body)

    def delete_model(self, name: str) -> JSONDict:
        """Remove a profile; answers once its instance (if any) is gone."""
        return self._json("DELETE", _model_path(name))

    def start_model(self, name: str) -> JSONDict:
        """Start a model now; answers once it is ready."""
        return self._json("POST", _model_path(name, "/start"))

    def warm_model(self, name: str) -> JSONDict:
        """Compile a model ahead of its first request; answers at once (see its ``compiled``)."""
        return self._json("POST", _model_path(name, "/warm"))

    def stop_model(self, name: str) -> JSONDict:
        """Stop a model's instance once no request is in flight; answers once it is gone."""
        return self._json("POST", _model_path(name, "/stop"))

    def reload_models(self) -> JSONDict:
        """Read the models file again now: ``{"models_file", "added", "removed", "changed"}``."""
        return self._json("POST", f"{MODELS}/reload")

    def model_log(self, name: str) -> bytes:
        """A model's log: its running instance's, else the end of its last failed start's;
        :class:`NotFoundError` if it has neither."""
        model = self.model(name)
        if model.get("instance_id"):
            return b"".join(self.iter_log(str(model["instance_id"])))
        response = self._send("GET", _model_path(name, "/log"))
        if not response.is_success:
            raise error_from_response(response)
        return response.content

    # -------------------------------------------------------------- logs

    def _log_piece(self, instance_id: str, start: int | None, end: int | None) -> tuple[bytes, int | None]:
        """Bytes of the log and its total size (None when no Range was sent)."""
        headers = {}
        if start is not None or end is not None:
            headers["Range"] = f"bytes={start or 0}-{'' if end is None else end}"
        response = self._send("GET", _path(instance_id, "/log"), headers=headers)
        if response.status_code == 416:  # nothing at or after start: nothing new yet
            return b"", _content_range_total(response.headers.get("content-range"))
        if not response.is_success:
            raise error_from_response(response)
        return response.content, _content_range_total(response.headers.get("content-range"))

    def log(self, instance_id: str, start: int | None = None, end: int | None = None) -> bytes:
        """Log bytes ``start..end`` (inclusive), at most 1 MiB per call.

        No bounds: the first MiB. ``start`` only: from ``start`` on. Empty when ``start`` is at
        or past the end of the log (the launcher's 416: nothing new).
        """
        return self._log_piece(instance_id, start, end)[0]

    def log_size(self, instance_id: str) -> int:
        """The log's current size in bytes."""
        total = self._log_piece(instance_id, 0, 0)[1]
        return total or 0

    def iter_log(self, instance_id: str, start: int = 0) -> Iterator[bytes]:
        """The log from ``start`` to its current end, in chunks of at most 1 MiB."""
        while True:
            chunk = self.log(instance_id, start)
            if not chunk:
                return
            start += len(chunk)
            yield chunk

    def follow_log(
        self, instance_id: str, *, start: int = 0, poll_interval: float = 0.5, stop_when_stopped: bool = True
    ) -> Iterator[bytes]:
        """Yield new log bytes as they are written, like ``tail -f``.

        Ends once the instance has stopped and its log is read to the end (unless
        ``stop_when_stopped`` is false), or when the instance is deleted. An instance unknown
        from the start raises :class:`NotFoundError`.
        """
        self.get(instance_id)  # NotFoundError now, rather than "deleted" later
        offset = start
        while True:
            try:
                for chunk in self.iter_log(instance_id, offset):
                    offset += len(chunk)
                    yield chunk
                if stop_when_stopped and self.get(instance_id).get("status") == "stopped":
                    # Stopped means every process of it is gone: one last read gets the rest.
                    for chunk in self.iter_log(instance_id, offset):
                        offset += len(chunk)
                        yield chunk
                    return
            except NotFoundError:
                return  # deleted while we followed it (its log went with it)
            time.sleep(poll_interval)

    # -------------------------------------------------------------- waiting and watching

    def wait_ready(
        self,
        instance_id: str,
        timeout: float = 600.0,
        poll_interval: float = 0.25,
        on_poll: Callable[[InstanceState, float], None] | None = None,
    ) -> InstanceState:
        """Poll the instance until it is ready and return its state.

        Raises :class:`InstanceStoppedError` (with ``exit_code``) if it stops or is deleted
        first, :class:`WaitTimeoutError` after ``timeout`` seconds, :class:`NotFoundError` if
        it never existed. ``on_poll(state, elapsed_seconds)`` is called after each poll.
        """
        started = time.monotonic()
        state: InstanceState | None = None
        while True:
            try:
                state = self.get(instance_id)
            except NotFoundError:
                if state is None:
                    raise
                raise InstanceStoppedError(instance_id, None) from None
            elapsed = time.monotonic() - started
            if on_poll is not None:
                on_poll(state, elapsed)
            if state.get("ready"):
                return state
            if state.get("status") == "stopped":
                raise InstanceStoppedError(instance_id, state)
            if elapsed >= timeout:
                raise WaitTimeoutError(instance_id, timeout)
            time.sleep(min(poll_interval, max(0.0, timeout - elapsed)))

    def watch(self, since: int | None = None, *, read_timeout: float | None = None) -> EventStream:
        """Open the watch stream (NDJSON) and return an iterator of its events.

        Without ``since`` it starts with a CREATED event per existing instance; with ``since``
        (a ``revision``, e.g. from :meth:`list`) it replays the events after it. The stream is
        open when this returns, so no later change is missed. ``read_timeout`` bounds the wait
        for each event (None: wait forever).
        """
        params = {} if since is None else {"since": str(since)}
        request = self._http.build_request(
            "GET", f"{INSTANCES}/watch", params=params, timeout=httpx.Timeout(self.timeout, read=read_timeout)
        )
        try:
            response = self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise LauncherConnectionError(self.base_url, exc) from exc
        if not response.is_success:
            try:
                raise error_from_response(response)
            finally:
                response.close()
        return EventStream(response, self.base_url)
