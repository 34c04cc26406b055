"""Model profiles for the front door: what to start when a request names a model.

Read from a YAML file (``--models-file``) at start and managed at run time through
``/v2/vllm/models``. A bad file is a start-up error that names the line and the field.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from launcher.frontdoor.sleep import DEV_MODE_ENV, SLEEP_FLAG
from launcher.instances.config import VllmConfig, did_you_mean
from launcher.instances.memory import parse_size

DEFAULT_IDLE_TIMEOUT = 300.0
MODEL_ANNOTATION = "launcher.front-door/model"  # on every instance the front door starts
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
    start_keepalive: StrictBool | None = Field(
        default=None,
        description="a stream waiting for this model's start gets its headers at once and SSE comments until its "
        "first chunk (unset: --start-keepalive)",
    )
    idle: Literal["stop", "sleep"] = Field(
        default="stop",
        description="when idle (or when room is needed): stop its instance, or put it to sleep (GPUs: vLLM's sleep mode)",
    )
    sleep_level: Literal[1, 2] = Field(
        default=1, description="1: weights to host memory, KV cache dropped; 2: both dropped (reloaded on wake)"
    )
    memory: StrictInt | StrictStr | None = Field(
        default=None, description="host memory it holds, bytes or with a unit ('6GiB'); unset: measured or estimated"
    )
    gpu_memory: StrictInt | StrictStr | None = Field(
        default=None, description="GPU memory it holds on each of its GPUs (unset: its --gpu-memory-utilization share)"
    )
    aliases: list[StrictStr] = Field(default_factory=list, description="other names clients may use")
    preload: StrictBool = Field(default=False, description="start it when the launcher starts")
    share_gpu: StrictBool = Field(
        default=False, description="may run beside another front-door instance on the same GPU (both must say so)"
    )

    @field_validator("memory", "gpu_memory")
    @classmethod
    def _is_a_size(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            parse_size(value)  # the error says what a size looks like
        return value

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

    def instance_config(self, name: str, placed_gpus: list[str] | None = None, *, sleep: bool = False) -> VllmConfig:
        """The instance to create: the options (plus the names clients use), env, GPUs, annotations.

        ``placed_gpus``: the GPUs the front door chose for a profile that names none. ``sleep``:
        started so that it can sleep (``--enable-sleep-mode``, vLLM's dev-mode endpoints).
        """
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
        env_vars = self.env_vars
        if sleep:
            if SLEEP_FLAG not in tokens:
                options += " " + SLEEP_FLAG
            env_vars = {**DEV_MODE_ENV, **(env_vars or {})}
        return VllmConfig(
            options=options,
            env_vars=env_vars,
            gpu_uuids=self.gpu_uuids if self.gpu_uuids is not None else placed_gpus,
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
    # No regex: "^...$" also matches before a final newline ("tiny\n" was once a model).
    if not 1 <= len(name) <= 256 or not name.isprintable() or any(char.isspace() for char in name):
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


# ------------------------------------------------------------ errors in plain words

_PROFILE_FIELDS = tuple(ModelProfile.model_fields)
_TOP_FIELDS = tuple(ModelsFile.model_fields)
_NESTING = "model profiles go under 'models:' (indent it by two spaces)"
_FIELDS_UNDER_MODELS = "did you put a profile's fields directly under 'models:'?"
_PYDANTIC_PREFIX = re.compile(r"(^|; )(?:(?:: )?(?:Value error|Assertion failed), )+")  # also those nested in it
_INNER_FIELD = re.compile(r"^(?P<field>\w+): (?P<message>[^;]*)$")
_EMPTY_MODELS = "list the model profiles under it, each indented by two spaces (or leave 'models' out)"
_TOP_PROFILE_FIELD = "it goes under a model name under 'models:'"


class _Problem(NamedTuple):
    location: tuple[str | int, ...]  # where in the data, for the line
    at_key: bool  # the line of the key at ``location`` rather than of its value
    message: str


def unknown_field(
    name: str, valid: Sequence[str], *, kind: str = "field", where: str = "", listing: str = "valid fields"
) -> str:
    """``unknown field 'alias' in model 'tiny' (did you mean 'aliases'?); valid fields: options, ...``."""
    place = f" {where}" if where else ""
    return f"unknown {kind} {name[:100]!r}{place}{did_you_mean(name, valid)}; {listing}: {', '.join(valid)}"


def _kind(value: object) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "a mapping" if isinstance(value, dict) else type(value).__name__


def _looks_like_profile(value: object) -> bool:
    """A mapping with a profile's fields (``options`` among them)."""
    return isinstance(value, dict) and "options" in value


def _path(parts: tuple[str | int, ...]) -> str:
    text = ""
    for part in parts:
        if part == "[key]":
            text += " (its key)"
        elif isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _pydantic_message(item: ErrorDetails) -> str:
    """Pydantic's message, without its ``Value error, `` prefixes, with the value given where it is short."""
    message = _PYDANTIC_PREFIX.sub(r"\1", item["msg"])[:500]
    value = item.get("input")
    if item["type"] not in ("value_error", "assertion_error", "missing"):
        if value is None:
            message += " (got an empty value)"
        elif isinstance(value, str | int | float):
            message += f" (got {value!r})" if len(repr(value)) <= 60 else f" (got {repr(value)[:57]}...)"
    return message


def _profile_problem(
    model: str | None, rest: tuple[str | int, ...], item: ErrorDetails, *, in_file: bool
) -> tuple[tuple[str | int, ...], bool, str]:
    """One error inside a profile (``rest``: the place in it): where in it, whether at a key, the message."""
    what = f"model {model[:100]!r}" if model is not None else "the model profile"
    kind, value = item["type"], item.get("input")
    example = 'options: "--model /path/to/model"' if in_file else '"options": "--model /path/to/model"'
    if not rest and kind == "value_error":  # what the instance API would refuse, e.g. "env_vars: 'A=B' is not ..."
        inner = _INNER_FIELD.match(_pydantic_message(item))
        if inner and inner["field"] in _PROFILE_FIELDS:
            field_name = inner["field"]
            return (field_name,), False, f"{what}, field {field_name!r}: {inner['message']}"
    if not rest:
        if kind not in ("model_type", "model_attributes_type", "dict_type"):
            return rest, True, f"{what}: {_pydantic_message(item)}"
        if value is None:
            return (
                rest,
                True,
                f"{what} is empty; its fields (at least {example}) go under it, indented by two more spaces",
            )
        message = f"{what} should be a mapping of fields (options, aliases, ...), not {_kind(value)}"
        if isinstance(value, str) and in_file and model not in _PROFILE_FIELDS:
            message += f"; to give it these vLLM flags, write them under it as {example}"
        return rest, True, message
    field = str(rest[0])
    if len(rest) == 1 and kind == "extra_forbidden":
        message = unknown_field(field, _PROFILE_FIELDS, where=f"in {what}" if model is not None else "")
        if in_file and _looks_like_profile(value):
            message += f"; {field[:100]!r} looks like a model profile itself: profiles go directly under 'models:'"
        return rest, True, message
    if len(rest) == 1 and kind == "missing":
        if field == "options":
            return rest, True, f"{what} has no 'options' (the vLLM flags, e.g. {example})"
        return rest, True, f"{what} has no {field!r}"
    where = f"{what}, field" if model is not None else "field"
    return rest, False, f"{where} {_path(rest)!r}: {_pydantic_message(item)}"


def _top_level_problem(item: ErrorDetails, location: tuple[str | int, ...], nested: bool) -> _Problem | None:
    """An error in the top level or in ``models`` itself (None: one to leave out)."""
    kind, value = item["type"], item.get("input")
    key = str(location[0])
    if location == ("models",):
        if value is None:
            if nested:  # a profile at the top level left it empty: that profile's message says it all
                return None
            return _Problem(location, True, f"'models' is empty; {_EMPTY_MODELS}")
        return _Problem(location, True, f"'models' should be a mapping of model names to profiles, not {_kind(value)}")
    if len(location) == 1 and kind == "extra_forbidden":
        if _looks_like_profile(value):
            return _Problem(location, True, f"{key[:100]!r} is at the top level; {_NESTING}")
        if key in _PROFILE_FIELDS:
            return _Problem(
                location,
                True,
                f"{key[:100]!r} is a field of a model profile, not of the top level; {_TOP_PROFILE_FIELD}",
            )
        return _Problem(
            location, True, unknown_field(key, _TOP_FIELDS, kind="top-level field", listing="the top level has")
        )
    return _Problem(location, False, f"top-level field {_path(location)!r}: {_pydantic_message(item)}")


def _problems(exc: ValidationError, model: str | None = None, *, in_file: bool = False) -> list[_Problem]:
    """The errors of validating a :class:`ModelsFile` or a :class:`ModelProfile`, in plain words."""
    items = exc.errors()
    if exc.title != ModelsFile.__name__:  # one profile, e.g. a PUT body
        problems = []
        for item in items:
            where, at_key, message = _profile_problem(model, tuple(item["loc"]), item, in_file=in_file)
            problems.append(_Problem(where, at_key, message))
        return problems
    nested = any(
        len(item["loc"]) == 1 and item["type"] == "extra_forbidden" and _looks_like_profile(item.get("input"))
        for item in items
    )
    problems = []
    for item in items:
        location = tuple(item["loc"])
        if not location:
            problems.append(_Problem(location, True, _pydantic_message(item)))
        elif location[0] != "models" or len(location) == 1:
            problem = _top_level_problem(item, location, nested)
            if problem is not None:
                problems.append(problem)
        elif len(location) >= 3 and location[2] == "[key]":
            name = location[1]
            problems.append(_Problem(location[:2], True, f"model name {name!r} should be a string; quote it: '{name}'"))
        else:
            name = str(location[1])
            where, at_key, message = _profile_problem(name, location[2:], item, in_file=in_file)
            if name in _PROFILE_FIELDS and _FIELDS_UNDER_MODELS not in message:
                message += f"; {_FIELDS_UNDER_MODELS}"
            problems.append(_Problem(location[:2] + where, at_key, message))
    return problems


def plain_errors(exc: ValidationError, model: str | None = None) -> list[str]:
    """The errors of ``ModelProfile.model_validate`` (or ``ModelsFile``'s) in plain words, one string each.

    ``unknown field 'alias' in model 'tiny' (did you mean 'aliases'?); valid fields: ...``,
    ``model 'tiny' has no 'options' (...)``, ``model 'tiny', field 'idle_timeout': Input should be ...``.
    ``model`` names the profile (``PUT /v2/vllm/models/{name}``); without it, "the model profile".
    """
    return [problem.message for problem in _problems(exc, model)]


def _line_of(node: yaml.Node | None, location: tuple[Any, ...], *, at_key: bool = False) -> int | None:
    """The 1-based line of the YAML node at ``location`` (as far as it exists); ``at_key``: of its key."""
    line = None if node is None else node.start_mark.line + 1
    for part in location:
        found: tuple[yaml.Node, yaml.Node] | None = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    found = (key, value)  # the last one, as yaml.safe_load keeps
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            found = (node.value[part], node.value[part])
        if found is None:
            break
        key_node, node = found
        line = (key_node if at_key else node).start_mark.line + 1
    return line


def _at(source: str, line: int | None) -> str:
    return f"{source}, line {line}" if line else source


class _UniqueKeys(yaml.SafeLoader):  # type: ignore[misc]
    """``yaml.safe_load``, but a key given twice in one mapping is an error (PyYAML keeps the last
    silently: a pasted profile not renamed would replace the first without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:  # its own keys (a merge's may be overridden on purpose)
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"{key_node.value!r} is given twice",
                                                            key_node.start_mark)  # fmt: skip
                seen.add(key_node.value)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def parse_models_file(text: str, source: str = "models file") -> ModelsFile:
    """Parse the YAML text of a models file; :class:`ProfileError` names the line and field.

    One problem a line, each ``<source>, line N: <what is wrong, in plain words>``, in line order.
    """
    try:
        data = yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader that refuses duplicate keys
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
        located = [
            (_line_of(root, problem.location, at_key=problem.at_key), problem.message)
            for problem in _problems(exc, in_file=True)
        ]
        located.sort(key=lambda pair: (pair[0] is None, pair[0] or 0))
        raise ProfileError("\n".join(f"{_at(source, line)}: {message}" for line, message in located)) from None
    for name in parsed.models:
        try:
            check_name(name)
        except ValueError as exc:
            raise ProfileError(f"{_at(source, _line_of(root, ('models', name), at_key=True))}: {exc}") from None
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
