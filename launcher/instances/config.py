"""An instance's configuration as a create request gives it, validated with pydantic. The same models describe the API in OpenAPI."""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, model_validator

from forkserver.protocol import valid_instance_id
from launcher.errors import BadRequest, Unprocessable
from launcher.request_body import load_json_object


class VllmConfig(BaseModel):
    """What a client asks for when it creates an instance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    options: StrictStr = Field(
        description="vLLM command-line options, e.g. '--model /models/opt --port 8000'",
        min_length=1,
    )
    env_vars: dict[StrictStr, StrictStr] | None = Field(
        default=None, description="environment variables for the instance (values are strings)"
    )
    gpu_uuids: list[StrictStr] | None = Field(
        default=None, description="GPUs for the instance, by UUID; become CUDA_VISIBLE_DEVICES"
    )
    annotations: dict[StrictStr, StrictStr] | None = Field(
        default=None, description="opaque labels, echoed back in the instance's state"
    )

    @model_validator(mode="after")
    def _strings_fit_a_process(self) -> VllmConfig:
        # Every string must survive UTF-8 (no lone surrogates) and the exec environment.
        strings: list[tuple[str, str]] = [("options", self.options)]
        strings += [(f"env_vars.{key}", key) for key in self.env_vars or {}]
        strings += [(f"env_vars.{key}", value) for key, value in (self.env_vars or {}).items()]
        strings += [(f"gpu_uuids.{index}", uuid) for index, uuid in enumerate(self.gpu_uuids or [])]
        for key, value in (self.annotations or {}).items():
            strings += [(f"annotations.{key}", key), (f"annotations.{key}", value)]
        for where, text in strings:
            try:
                text.encode()
            except UnicodeEncodeError:
                raise ValueError(f"{where[:100]!a} is not valid Unicode text (a lone surrogate)") from None
            if "\0" in text and not where.startswith("annotations"):
                raise ValueError(f"{where[:100]!r} contains a NUL character")
        for name in self.env_vars or {}:
            if not name or "=" in name:
                raise ValueError(f"env_vars: {name[:100]!r} is not a valid environment variable name")
        return self

    def argv(self, *, shell: bool = True) -> list[str]:
        """``options`` split as a POSIX shell would (quotes respected, nothing expanded); with
        ``shell=False`` at whitespace only, as llm-d FMA's launcher does (quotes kept, so
        ``--compilation-config {"level":0}`` reaches vLLM as written)."""
        if not shell:
            return self.options.split()
        try:
            return shlex.split(self.options)
        except ValueError as exc:
            raise BadRequest(f"options cannot be split into arguments: {exc}") from None

    def as_requested(self) -> VllmConfig:
        """The configuration without the ``CUDA_VISIBLE_DEVICES`` the launcher adds to ``env_vars`` for
        ``gpu_uuids`` (what a client asked for; two configs compare equal whatever GPUs they got)."""
        if self.gpu_uuids is None or "CUDA_VISIBLE_DEVICES" not in (self.env_vars or {}):
            return self
        env = {key: value for key, value in (self.env_vars or {}).items() if key != "CUDA_VISIBLE_DEVICES"}
        return self.model_copy(update={"env_vars": env or None})

    def echo(self) -> dict[str, Any]:
        """The config fields echoed in state objects (only those given)."""
        return self.model_dump(exclude_none=True)


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "body"
        problems.append(f"{where[:200]}: {item['msg'][:500]}")
    return "invalid request body: " + "; ".join(problems)


def parse_config(body: bytes, *, strict: bool = True, empty_options: bool = False) -> tuple[VllmConfig, list[str]]:
    """Parse and validate a create body; 400 for bad JSON, 422 for a wrong shape.

    Unknown top-level fields are a 422 when ``strict``; otherwise they are dropped and returned
    (sorted), so that a client newer than this launcher (FMA's controller adding a field) still
    creates instances. ``empty_options`` lets ``options: ""`` through (FMA's launcher takes it).
    """
    data = load_json_object(body)
    ignored = [] if strict else sorted(key for key in data if key not in VllmConfig.model_fields)
    kept = {key: value for key, value in data.items() if key not in ignored}
    try:
        return validate_config(kept, empty_options=empty_options), ignored
    except ValidationError as exc:
        raise Unprocessable(_describe(exc)) from None


def validate_config(data: Any, *, empty_options: bool = False) -> VllmConfig:
    """``VllmConfig.model_validate``, letting ``options: ""`` through when ``empty_options`` (FMA's
    entry takes it; an API adopting the forkserver's instances must take what an earlier one took)."""
    empty = empty_options and isinstance(data, dict) and data.get("options") == ""
    config = VllmConfig.model_validate({**data, "options": "-"} if empty else data)
    return config.model_copy(update={"options": ""}) if empty else config


RESERVED_IDS = frozenset({"watch"})  # path words under /v2/vllm/instances/


def check_instance_id(instance_id: str) -> str:
    """Return ``instance_id`` if valid, else raise a 400 that says what is allowed."""
    if instance_id in RESERVED_IDS:
        raise BadRequest(f"instance id {instance_id!r} is reserved (it is an endpoint's path)")
    if not valid_instance_id(instance_id):
        raise BadRequest(
            f"invalid instance id {instance_id[:200]!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return instance_id


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` when one of ``valid`` is close to ``name`` (difflib), else ``""``."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
