"""Shared fixtures: real launchers (stand-in or vLLM workload) and the tiny model."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.launcher_process import REPO, VLLM_ENV, LauncherProcess


@pytest.fixture(scope="module")
def standin() -> Iterator[LauncherProcess]:
    """A launcher whose instances run the stand-in server; instances are deleted after each test."""
    launcher = LauncherProcess(
        workload="standin",
        env={"LAUNCHER_STOP_TIMEOUT": "2", "LAUNCHER_MOCK_GPUS": "1", "LAUNCHER_MOCK_GPU_COUNT": "4"},
    )
    yield launcher
    leftovers = launcher.stop()
    assert not leftovers, f"processes outlived the launcher: {leftovers}"


@pytest.fixture(autouse=True)
def _clean_instances(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "standin" in request.fixturenames:
        launcher: LauncherProcess = request.getfixturevalue("standin")
        if launcher.process.poll() is None:
            launcher.client.delete("/v2/vllm/instances")


# What vLLM, torch and the launcher leave in the temp directory when clean-up fails: ZMQ IPC
# sockets (UUID names), vllm_dist_* files, torch caches, multiprocessing dirs, launcher dirs.
# Other files there belong to whoever else uses the machine.
_LEFTOVER_NAME = re.compile(r"^(vllm|torchinductor|pymp-|lt-|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-)")


def _leftover_like(names: set[str]) -> set[str]:
    def is_socket(name: str) -> bool:
        try:
            return stat.S_ISSOCK(os.lstat(os.path.join(tempfile.gettempdir(), name)).st_mode)
        except FileNotFoundError:
            return False

    return {name for name in names if _LEFTOVER_NAME.match(name) or is_socket(name)}


def _shm_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("psm_")}


@contextlib.contextmanager
def real_vllm_launcher(**env: str) -> Iterator[LauncherProcess]:
    """A launcher with the real vLLM workload and an empty vLLM cache (``env``: more settings).

    On the way out: no process of it is left, nor a shared-memory segment or temp file.
    """
    cache = tempfile.mkdtemp(prefix="vllm-cache-")
    shm_before = _shm_segments()
    tmp_before = set(os.listdir(tempfile.gettempdir()))
    launcher = LauncherProcess(
        workload="vllm",
        env={"VLLM_CACHE_ROOT": cache, **VLLM_ENV, "LAUNCHER_STOP_TIMEOUT": "20", **env},
        ready_timeout=300.0,
    )
    try:
        yield launcher
    finally:
        output = launcher.output_text()
        leftovers = launcher.stop()
        shutil.rmtree(cache, ignore_errors=True)
    assert not leftovers, f"processes outlived the launcher: {leftovers}\n{output[-3000:]}"
    assert _shm_segments() <= shm_before, "shared-memory segments left behind"
    new_tmp = _leftover_like(set(os.listdir(tempfile.gettempdir())) - tmp_before)
    assert not new_tmp, f"files left in the temp directory: {new_tmp}"


@pytest.fixture(scope="module")
def vllm_launcher() -> Iterator[LauncherProcess]:
    """A launcher with the real vLLM workload (the forkserver preloads vLLM first)."""
    with real_vllm_launcher() as launcher:
        yield launcher


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real Llama model built locally (no hub), in a subprocess: torch stays out of pytest."""
    target = Path(os.environ.get("LAUNCHER_TEST_TINY_MODEL") or tmp_path_factory.mktemp("models") / "tiny-llama")
    scratch = tmp_path_factory.mktemp("model-build-tmp")  # torch drops caches in TMPDIR
    subprocess.run(
        [sys.executable, "-m", "tests.tiny_model", str(target)],
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(scratch)},
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target
