"""The launcher's settings: one frozen object, read once from CLI flags and the environment.

Every field has a flag ``--some-name`` and an environment twin ``LAUNCHER_SOME_NAME``; a flag
beats the environment, which beats the default. ``uvicorn launcher.app:app`` reads only the
environment, so everything is configurable either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

ENV_PREFIX = "LAUNCHER_"
# LAUNCHER_* variables that are not settings of the API: launcherctl's, the tests' own, the zygotes' knobs.
OTHER_VARIABLES = frozenset({"LAUNCHER_URL", "LAUNCHER_BASE_URL"})
OTHER_PREFIXES = ("LAUNCHER_TEST_", "LAUNCHER_FUZZ_", "LAUNCHER_ZYGOTE_")
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


def _default_state_dir() -> str:
    return os.path.join(tempfile.gettempdir(), f"vllm-launcher-{os.getuid()}")


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    """Everything the launcher can be told. See docs/configuration.md."""

    host: str = _setting("0.0.0.0", "address the API listens on")
    port: int = _setting(8001, "port the API listens on")
    log_level: str = _setting("info", "log level of the API (debug, info, warning, error)")
    access_log: bool = _setting(
        False, "a log line per HTTP request (uvicorn's access log); off: the launcher logs what happens to instances"
    )
    log_dir: str = _setting("", "directory of instance log files (default: <tmp>/vllm-launcher-<uid>/<port>/logs)")
    runtime_dir: str = _setting("", "private directory for the forkserver socket (default: a new one under <tmp>)")
    stop_timeout: float = _setting(10.0, "seconds between SIGTERM and SIGKILL when stopping an instance")
    stop_timeout_starting: float = _setting(
        2.0, "the same for an instance not yet ready (vLLM 0.32 can hang on SIGTERM while starting)"
    )
    max_instances: int = _setting(32, "most live (running or starting) instances at once; 429 beyond (0: no limit)")
    mock_gpus: bool = _setting(False, "pretend this node has GPUs GPU-0 ... GPU-<N-1> (no NVML needed)")
    mock_gpu_count: int = _setting(8, "how many mock GPUs --mock-gpus shows")
    gpu_map: str = _setting(
        "", "with --mock-gpus: a GPU map like FMA's gpu-map ConfigMap (file, or the ConfigMap mounted as a directory)"
    )
    node_name: str = _setting("", "this node's entry in --gpu-map (default: $NODE_NAME)")
    fma_compat: bool = _setting(
        False,
        "answer as llm-d FMA's own launcher where the two differ (on in /app/launcher.py; docs/fma.md lists each)",
    )
    watch_window: int = _setting(1000, "events kept for watch?since=N (410 for older revisions)")
    forkserver_socket: str = _setting(
        "", "attach to a forkserver started on its own (python -m forkserver --socket PATH) instead of starting one"
    )
    forkserver_workload: str = _setting("vllm", "what instances run: vllm, standin, or module:attribute")
    forkserver_preload: str = _setting(
        "", "comma-separated modules the forkserver imports (default: vLLM's serve path)"
    )
    forkserver_python: str = _setting(sys.executable, "Python interpreter that runs the forkserver")
    fork_engine: bool = _setting(True, "on CPU, fork vLLM's EngineCore from the instance instead of spawning it")
    in_process_worker: bool = _setting(True, "on CPU, run a single-process model inside the EngineCore")
    share_weights: bool = _setting(
        True, "instances of one model fork from a process that holds its loaded weights: one copy, no load per start"
    )
    inspect_models_in_fork: bool = _setting(
        True, "inspect a new model architecture in a fork of the instance (off: in a new Python, as vLLM does)"
    )
    compile_cache_fix: bool = _setting(
        True, "let vLLM load its compiled model from its cache on CPU (off: every start compiles again, as vLLM does)"
    )
    forkserver_start_timeout: float = _setting(300.0, "seconds to wait for the forkserver to preload")
    api_token: str = _setting("", "bearer token every endpoint but /health requires (empty: no token)")
    api_token_file: str = _setting("", "file holding the bearer token (beats --api-token)")
    max_body_bytes: int = _setting(65536, "largest accepted request body, in bytes (413 above)")
    strict_fields: bool = _setting(False, "refuse create bodies with unknown fields (422) instead of ignoring them")
    models_file: str = _setting("", "YAML file of model profiles for the OpenAI-compatible front door (/v1)")
    watch_models_file: bool = _setting(
        True, "apply changes of the models file as they happen (off: only on SIGHUP or POST /v2/vllm/models/reload)"
    )
    compile_ahead: bool = _setting(
        True, "compile each front-door model (vLLM's default mode) in a throwaway instance before its first request"
    )
    compile_ahead_timeout: float = _setting(1800.0, "seconds a front-door compile-ahead may take before it is given up")
    start_timeout: float = _setting(1800.0, "seconds a front-door start may take to be ready before it fails")
    memory_budget: str = _setting(
        "0", "host memory the front door's instances may hold together, bytes or with a unit ('48GiB'; 0: no budget)"
    )
    gpu_memory_reserve: str = _setting("1GiB", "GPU memory each device keeps free of instances (its budget: the rest)")
    footprints_file: str = _setting(
        "", "where measured model footprints are kept across restarts (default: beside the log directory)"
    )
    start_keepalive: bool = _setting(
        False,
        "a front-door stream waiting for its model's start gets its headers at once and an SSE comment every few "
        "seconds until its first chunk (a profile's start_keepalive beats it)",
    )
    queue_timeout: float = _setting(60.0, "seconds a front-door start waits for room before a 503")
    queue_max: int = _setting(256, "most front-door requests waiting for a start at once (503 beyond)")
    proxy_read_timeout: float = _setting(
        300.0, "seconds a front-door upstream may send nothing before its request ends with an error (0: never)"
    )
    proxy_max_body_bytes: int = _setting(16 * 1024 * 1024, "largest /v1 request body, in bytes (413 above)")

    def resolved_footprints_file(self) -> str:
        """The footprints file, with the default filled in (beside the log directory)."""
        return self.footprints_file or os.path.join(
            os.path.dirname(self.resolved_log_dir().rstrip("/")), "footprints.json"
        )

    def resolved_log_dir(self) -> str:
        """The log directory, with the default filled in (one per API port: launchers never share)."""
        return self.log_dir or os.path.join(_default_state_dir(), str(self.port), "logs")

    @classmethod
    def from_sources(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Read flags from ``argv`` (None: no flags) over ``LAUNCHER_*`` from ``environ``."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + item.name.upper())
            if raw is not None:
                values[item.name] = _convert(item.name, item.type, raw)
        if argv is not None:
            parsed = _argument_parser(cls).parse_args(list(argv))
            values.update({name: value for name, value in vars(parsed).items() if value is not None})
        return cls(**values)


def served_port(argv: Sequence[str]) -> int | None:
    """The ``--port`` of a ``uvicorn launcher.app:app`` command line (None: not uvicorn, or no port given).

    Under uvicorn the app reads only the environment; without this the default log directory would
    be port 8001's whatever port is served, and a later ``make run`` would find it in use.
    """
    program = os.path.basename(argv[0]) if argv else ""
    if not (program == "uvicorn" or argv[0].replace(os.sep, "/").endswith("uvicorn/__main__.py")):
        return None
    for index, word in enumerate(argv):
        value = argv[index + 1] if word == "--port" and index + 1 < len(argv) else None
        value = word.split("=", 1)[1] if word.startswith("--port=") else value
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return None
    return 8000  # uvicorn's own default


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ``LAUNCHER_*`` variable that is no setting (a typo is otherwise silent)."""
    environ = os.environ if environ is None else environ
    known = [ENV_PREFIX + item.name.upper() for item in dataclasses.fields(Settings)]
    warnings = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known and name not in OTHER_VARIABLES \
                and not name.startswith(OTHER_PREFIXES):  # fmt: skip
            bare = [setting.removeprefix(ENV_PREFIX) for setting in known]  # the shared prefix matches nothing
            close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), bare, n=1, cutoff=0.6)
            hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
            warnings.append(f"{name} is not a setting of the launcher{hint}: it is ignored")
    return warnings


class _Parser(argparse.ArgumentParser):
    """argparse that answers an unknown flag in one line with the nearest real one, not 36 lines of usage."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            flags = [action for item in self._actions for action in item.option_strings]
            words = message.removeprefix("unrecognized arguments: ").split()
            unknown = next((word for word in words if word.startswith("-")), words[0] if words else "")
            name = unknown.split("=", 1)[0]
            close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            what = f"unknown flag {name}" if name.startswith("-") else f"unexpected argument {name!r}"
            self.exit(2, f"{self.prog}: {what}{hint} ({self.prog} --help lists the flags)\n")
        self.exit(2, f"{self.prog}: {message} ({self.prog} --help lists the flags)\n")


def _convert(name: str, type_name: Any, raw: str) -> Any:
    kind = str(type_name)
    try:
        if kind == "bool":
            word = raw.strip().lower()
            if word in TRUE_WORDS:
                return True
            if word in FALSE_WORDS:
                return False
            raise ValueError(f"expected one of {sorted(TRUE_WORDS | FALSE_WORDS)}")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as exc:
        raise SystemExit(f"invalid {ENV_PREFIX}{name.upper()}={raw!r}: {exc}") from None
    return raw


def _argument_parser(cls: type[Settings]) -> argparse.ArgumentParser:
    parser = _Parser(
        allow_abbrev=False,  # vLLM's --model is not --models-file
        prog="python -m launcher",
        description="Multi-instance vLLM launcher: a REST API that forks vLLM servers on demand.",
        epilog=f"Every flag can also be set as an environment variable {ENV_PREFIX}<FLAG>, "
        "e.g. --log-dir as LAUNCHER_LOG_DIR.",
    )
    for item in dataclasses.fields(cls):
        flag = "--" + item.name.replace("_", "-")
        env_name = ENV_PREFIX + item.name.upper()
        help_text = f"{item.metadata['help']} [env {env_name}; default {item.default!r}]"
        kind = str(item.type)
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            converter = {"int": int, "float": float}.get(kind, str)
            parser.add_argument(flag, type=converter, default=None, help=help_text)
    return parser
