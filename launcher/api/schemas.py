"""Response bodies of the API, as pydantic models.

They are the single source of the response schemas in ``GET /openapi.json`` (see
:mod:`launcher.api.openapi`), and the tests validate real answers of a running launcher against
them. Every model forbids unknown fields, so a field added to an answer without being added
here fails those tests instead of drifting silently.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict
from pydantic.json_schema import SkipJsonSchema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _drop_default(schema: JsonDict) -> None:
    schema.pop("default", None)


def _sometimes(description: str) -> Any:
    """A field that is either absent or has a value (never null): the schema has no default."""
    return Field(default=None, description=description, json_schema_extra=_drop_default)


class _Configured(_Strict):
    """The configuration fields an answer echoes: ``options`` always, the others when given."""

    options: str = Field(description="the options (vLLM flags) as given")
    env_vars: dict[str, str] | SkipJsonSchema[None] = _sometimes("as given, when given")
    gpu_uuids: list[str] | SkipJsonSchema[None] = _sometimes("as given, when given")
    annotations: dict[str, str] | SkipJsonSchema[None] = _sometimes("as given, when given")


class CreateResponse(_Configured):
    """``201`` answer of ``POST /v2/vllm/instances`` and ``PUT /v2/vllm/instances/{id}``."""

    status: Literal["started"]
    instance_id: str = Field(description="the id given in the path, or a new UUID for POST")
    pid: int = Field(description="the instance's main process")
    port: int = Field(description="the port the instance serves on")
    model: str = Field(description="the model the instance serves")
    revision: int = Field(description="the event revision of the instance's creation")
    ignored_fields: list[str] | SkipJsonSchema[None] = _sometimes(
        "unknown top-level fields of the body that were ignored (also in a `Warning: 299` header)"
    )
    warning: str | SkipJsonSchema[None] = _sometimes("the ignored fields in words, with the likely field meant")


class MemoryState(_Strict):
    """What an instance holds (sampled: every 2 s while it starts or changes, up to 2 minutes apart at
    rest), or what a model is expected to hold."""

    host_bytes: int = Field(description="host memory: PSS of every process of the instance")
    gpu_bytes: dict[str, int] = Field(description="GPU memory per device UUID (NVML; mock GPUs: the vLLM share)")


class InstanceState(_Configured):
    """One instance's state: ``GET /v2/vllm/instances/{id}`` and each item of the detailed list."""

    status: Literal["running", "stopped"] = Field(
        description="'stopped' once the instance's process ended by itself or was killed"
    )
    instance_id: str
    pid: int = Field(description="the instance's main process")
    port: int = Field(description="the port the instance serves on")
    model: str = Field(description="the model the instance serves")
    created_at: float = Field(description="Unix time the instance was forked")
    ready: bool = Field(description="true once the instance answered its /health with 200")
    ready_at: float | None = Field(description="Unix time of the first healthy answer; null before")
    start_seconds: float | None = Field(description="seconds from the create request to ready; null before")
    start_phases: dict[str, float] | None = Field(
        description="where start_seconds went, once ready: parse, fork, engine_init, compile (torch.compile or "
        "loading its cached artifact), graphs (CUDA graph capture), ready; 0 for a phase that did not happen; "
        "null before ready or when the workload writes no phase markers"
    )
    revision: int = Field(description="the event revision of the instance's last change")
    exit_code: int | None = Field(
        default=None,
        description="stopped instances only: exit code; negative is the killing signal (-9 = SIGKILL); null if unknown",
        json_schema_extra=_drop_default,
    )
    stopped_at: float | SkipJsonSchema[None] = _sometimes(
        "stopped instances only: Unix time no process of the instance was left"
    )
    memory: MemoryState | SkipJsonSchema[None] = _sometimes("running instances, once sampled: what it holds now")
    sleeping: bool | SkipJsonSchema[None] = _sometimes("true while the front door has it asleep (vLLM's sleep mode)")
    stop_reason: str | SkipJsonSchema[None] = _sometimes(
        "stopped instances only, when known: the last error line of its log (an instance that failed "
        "by itself), or what stopped it (e.g. the forkserver died)"
    )


class InstanceList(_Strict):
    """``GET /v2/vllm/instances`` (``detail=True``, the default)."""

    total_instances: int
    running_instances: int
    instances: list[InstanceState]
    revision: int = Field(description="the current event revision: watch with since=<revision> from here")


class InstanceIdList(_Strict):
    """``GET /v2/vllm/instances?detail=False``."""

    instance_ids: list[str]
    count: int
    revision: int = Field(description="the current event revision: watch with since=<revision> from here")


class DeleteResponse(_Configured):
    """``DELETE /v2/vllm/instances/{id}``: sent once no process of the instance is left."""

    status: Literal["terminated"]
    instance_id: str
    revision: int = Field(description="the event revision of the deletion")


class DeleteAllResponse(_Strict):
    """``DELETE /v2/vllm/instances``."""

    status: Literal["all_stopped"]
    stopped_instances: list[DeleteResponse]
    total_stopped: int


class HealthResponse(_Strict):
    """``GET /health``: ``OK`` (200) or ``unavailable`` (503) with the reason."""

    status: Literal["OK", "unavailable"]
    detail: str | SkipJsonSchema[None] = _sometimes("with status unavailable: why")


class IndexResponse(_Strict):
    """``GET /``."""

    name: str
    version: str
    endpoints: dict[str, str] = Field(description="endpoint name -> 'METHOD /path'")


class Gpu(_Strict):
    """One GPU of the node and the live instances pinned to it."""

    index: int
    uuid: str
    name: str
    memory_mib: int | None
    instances: list[str] = Field(description="ids of the running instances using this GPU")


class GpuList(_Strict):
    """``GET /v2/vllm/gpus``."""

    gpus: list[Gpu]
    count: int
    mock: bool = Field(description="true when the GPUs are the mock set (--mock-gpus)")


class WatchError(_Strict):
    """The object of an ``ERROR`` event: the stream ends; resume with ``since=revision``."""

    detail: str
    revision: int


class WatchEvent(_Strict):
    """One line of ``GET /v2/vllm/instances/watch`` (NDJSON)."""

    type: Literal["CREATED", "READY", "MODIFIED", "STOPPED", "DELETED", "ERROR"]
    object: InstanceState | WatchError = Field(description="the instance's state after the change; for ERROR, why")
    time: float | SkipJsonSchema[None] = _sometimes("Unix time of the change (replayed events keep theirs)")


class ErrorResponse(_Strict):
    """Every error answer."""

    detail: str = Field(description="what is wrong")


class ExpectedMemory(MemoryState):
    """A model's expected footprint: the profile's ``memory``, the peak measured, or an estimate."""

    source: Literal["declared", "measured", "estimated"]


class ModelState(_Configured):
    """A front-door model profile and its state (``/v2/vllm/models``)."""

    name: str
    idle_timeout: float = Field(description="seconds without a request before its instance stops (0: never)")
    aliases: list[str]
    preload: bool
    share_gpu: bool
    state: Literal["stopped", "starting", "ready", "failed", "stopping", "sleeping", "waking", "invalid"]
    instance_id: str | None = Field(description="its instance, while it has one")
    last_used: float | None = Field(description="Unix time of the last request (null: never used)")
    in_flight: int = Field(description="requests being answered now")
    last_error: str | None = Field(
        description="why its profile cannot run (state invalid), why the last start failed, or what stopped its instance"
    )
    compiled: bool | Literal["compiling"] = Field(
        description="vLLM's compiled model for this profile is in the cache (true; also for eager profiles), "
        "being compiled ahead in a throwaway instance ('compiling'), or not known to be (false)"
    )
    compile_error: str | None = Field(description="why the last compile-ahead failed; null otherwise")
    start_timeout: float | SkipJsonSchema[None] = _sometimes("as given, when given")
    idle: Literal["stop", "sleep"] = Field(description="when idle or evicted: stop it, or put it to sleep")
    sleep_level: Literal[1, 2] = Field(description="vLLM's sleep level, for idle: sleep")
    start_keepalive: bool | SkipJsonSchema[None] = _sometimes("as given, when given")
    memory: int | str | SkipJsonSchema[None] = _sometimes("as given, when given")
    gpu_memory: int | str | SkipJsonSchema[None] = _sometimes("as given, when given")
    memory_estimate: ExpectedMemory = Field(description="what its instance is expected to hold, and why")
    fits: bool = Field(description="false: it exceeds a memory budget even on an empty node (requests get 503)")
    fit_problem: str | SkipJsonSchema[None] = _sometimes("when it does not fit: why")


class BudgetUse(_Strict):
    """One memory budget (0: none) and what the running instances hold against it."""

    budget_bytes: int
    used_bytes: int


class MemoryUse(_Strict):
    """The host budget (``--memory-budget``) and each GPU's (its size less ``--gpu-memory-reserve``)."""

    host: BudgetUse
    gpus: dict[str, BudgetUse]


class ModelList(_Strict):
    """``GET /v2/vllm/models``."""

    idle_timeout: float = Field(description="the default idle timeout (seconds)")
    models: list[ModelState]
    count: int
    memory: MemoryUse = Field(description="each memory budget and what running instances hold against it")
    models_file: str | None = Field(description="the models file (--models-file); null: none")
    file_error: str | None = Field(
        description="why the models file could not be read at its last change (the running models stay); null: it was"
    )
    warning: str | SkipJsonSchema[None] = _sometimes("with no models file: changes are not kept across restarts")


class ReloadResult(_Strict):
    """``POST /v2/vllm/models/reload``: what the models file changed."""

    models_file: str
    added: list[str]
    removed: list[str]
    changed: list[str]


class ModelDeleted(_Strict):
    """``DELETE /v2/vllm/models/{name}``: the profile is gone, and its instance."""

    status: Literal["deleted"]
    name: str


class OpenAIModel(_Strict):
    """One entry of ``GET /v1/models`` (one per name and alias)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str = Field(description="the profile's name (differs from id for an alias)")
    state: Literal["stopped", "starting", "ready", "failed", "stopping", "sleeping", "waking", "invalid"]


class OpenAIModelList(_Strict):
    """``GET /v1/models``, in OpenAI's list format."""

    object: Literal["list"]
    data: list[OpenAIModel]


class OpenAIErrorDetail(_Strict):
    """What went wrong, as OpenAI's SDKs read it."""

    message: str
    type: str
    code: str | None


class OpenAIError(_Strict):
    """Every front-door (``/v1``) error answer."""

    error: OpenAIErrorDetail


RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    CreateResponse,
    InstanceState,
    InstanceList,
    InstanceIdList,
    DeleteResponse,
    DeleteAllResponse,
    HealthResponse,
    IndexResponse,
    Gpu,
    GpuList,
    WatchError,
    WatchEvent,
    ErrorResponse,
    ModelState,
    ModelList,
    ModelDeleted,
    ReloadResult,
    OpenAIModel,
    OpenAIModelList,
    OpenAIErrorDetail,
    OpenAIError,
)
