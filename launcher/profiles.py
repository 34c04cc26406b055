"""Model profiles for the front door: what to start when a request names a model.

Read from a YAML file (``--models-file``) at start and managed at run time through
``/v2/vllm/models``. A bad file is a start-up error that names the line and the field.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from launcher.models import VllmConfig

DEFAULT_IDLE_TIMEOUT = 300.0
MODEL_ANNOTATION = "launcher.front-door/model"  # on every instance the front door starts
_NAME = re.compile(r"^[^\s\x00-\x1f\x7f]{1,256}$")
_SERVED_NAME_FLAG = "--served-model-name"


class ModelProfile(BaseModel):
    """One model clients can name in ``"model"``, and how to start it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    options: StrictStr = Field(min_length=1, description="vLLM flags; the front door picks the port")
    env_vars: dict[StrictStr, StrictStr] | None = Field(default=None, description="environment of the instance")
    gpu_uuids: list[StrictStr] | None = Field(default=None, description="GPUs for the instance, by UUID")
    annotations: dict[StrictStr, StrictStr] | None = Field(default=None, description="labels on its instance")
    idle_timeout: float | None = Field(
        default=None, ge=0, description="seconds without a request before it is stopped (0: never; unset: the default)"
    )
    start_timeout: float | None = Field(
        default=None, gt=0, description="seconds a start may take to be ready before it fails (unset: --start-timeout)"
    )
    aliases: list[StrictStr] = Field(default_factory=list, description="other names clients may use")
    preload: StrictBool = Field(default=False, description="start it when the launcher starts")
    share_gpu: StrictBool = Field(
        default=False, description="may run beside another front-door instance on the same GPU (both must say so)"
    )

    @field_validator("aliases")
    @classmethod
    def _aliases_are_names(cls, aliases: list[str]) -> list[str]:
        for alias in aliases:
            check_name(alias)
        return aliases

    @model_validator(mode="after")
    def _makes_a_valid_instance(self) -> ModelProfile:
        # What the instance API would refuse (environment names, NULs, ...) is refused here already.
        try:
            self.instance_config("profile")
        except ValidationError as exc:
            raise ValueError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
        return self

    def host(self, tokens: list[str] | None = None) -> str | None:
        """The ``--host`` the options set (None: the front door's loopback default)."""
        if tokens is None:
            try:
                tokens = shlex.split(self.options)
            except ValueError:
                return None
        for index, token in enumerate(tokens):
            if token == "--host":
                return tokens[index + 1] if index + 1 < len(tokens) else ""
            if token.startswith("--host="):
                return token.split("=", 1)[1]
        return None

    def instance_config(self, name: str) -> VllmConfig:
        """The instance to create: the options (plus the names clients use), env, GPUs, annotations."""
        options = self.options
        try:
            tokens = shlex.split(options)
        except ValueError:
            tokens = []  # VllmConfig.argv reports the quoting error when the instance is created
        if not any(token == _SERVED_NAME_FLAG or token.startswith(_SERVED_NAME_FLAG + "=") for token in tokens):
            options += " " + shlex.join([_SERVED_NAME_FLAG, name, *self.aliases])
        if self.host(tokens) is None:
            # Reached through the front door only, which checks the token: nothing to open to the network.
            options += " --host 127.0.0.1"
        return VllmConfig(
            options=options,
            env_vars=self.env_vars,
            gpu_uuids=self.gpu_uuids,
            annotations={**(self.annotations or {}), MODEL_ANNOTATION: name},
        )


class OpenAIRequest(BaseModel):
    """What the front door reads from a ``POST /v1/...`` body; everything else passes through."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr = Field(description="a model name or alias from GET /v1/models")


class ModelsFile(BaseModel):
    """The whole ``--models-file``."""

    model_config = ConfigDict(extra="forbid")

    idle_timeout: float = Field(default=DEFAULT_IDLE_TIMEOUT, ge=0)
    models: dict[StrictStr, ModelProfile] = Field(default_factory=dict)


class ProfileError(ValueError):
    """A profile or models file that cannot be used; the message names the place."""


def check_name(name: str) -> str:
    """A model name or alias: 1-256 printable characters without spaces."""
    if not _NAME.match(name):
        raise ValueError(f"{name[:100]!r} is not a model name: use 1-256 printable characters, no spaces")
    return name


def check_unique_names(models: dict[str, ModelProfile]) -> None:
    """Every name and alias must point at exactly one profile."""
    owner: dict[str, str] = {}
    for name, profile in models.items():
        check_name(name)
        for label in [name, *profile.aliases]:
            if label in owner and owner[label] != name:
                raise ProfileError(f"model name {label!r} is used by both {owner[label]!r} and {name!r}")
            owner[label] = name


def _line_of(node: yaml.Node | None, location: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at ``location`` (as far as it exists)."""
    line = None if node is None else node.start_mark.line + 1
    for part in location:
        if not isinstance(node, yaml.MappingNode):
            break
        for key, value in node.value:
            if key.value == str(part):
                node = value
                line = value.start_mark.line + 1
                break
        else:
            break
    return line


def parse_models_file(text: str, source: str = "models file") -> ModelsFile:
    """Parse the YAML text of a models file; :class:`ProfileError` names the line and field."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise ProfileError(f"{source}{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProfileError(f"{source}, line 1: expected a mapping with 'models' (and optionally 'idle_timeout')")
    try:
        parsed = ModelsFile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for item in exc.errors():
            location = tuple(item["loc"])
            line = _line_of(root, location)
            field = ".".join(str(part) for part in location) or "(top level)"
            problems.append(f"line {line}, {field}: {item['msg']}" if line else f"{field}: {item['msg']}")
        raise ProfileError(f"{source}: " + "; ".join(problems)) from None
    try:
        check_unique_names(parsed.models)
    except ValueError as exc:
        raise ProfileError(f"{source}: {exc}") from None
    return parsed


def load_models_file(path: str) -> ModelsFile:
    """Read ``--models-file``; an empty path means no profiles."""
    if not path:
        return ModelsFile()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read models file {path}: {exc}") from None
    return parse_models_file(text, source=f"models file {path}")
