"""Shared fixtures: real launchers (stand-in or vLLM workload) and the tiny model."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.frontdoor import lifecycle
from tests.launcher_process import REPO, VLLM_ENV, LauncherProcess

lifecycle.strict = True  # in-process front doors too: a transition its table lacks raises


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


def _shm_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("psm_")}


@contextlib.contextmanager
def real_vllm_launcher(server: str | list[str] = "launcher", **env: str) -> Iterator[LauncherProcess]:
    """A launcher with the real vLLM workload and an empty vLLM cache (``env``: more settings;
    ``server``: as :class:`LauncherProcess` takes it).

    On the way out: no process of it is left, nor a shared-memory segment or temp file.
    """
    cache = tempfile.mkdtemp(prefix="vllm-cache-")
    shm_before = _shm_segments()
    launcher = LauncherProcess(
        workload="vllm",
        env={"VLLM_CACHE_ROOT": cache, **VLLM_ENV, "LAUNCHER_STOP_TIMEOUT": "20", **env},
        ready_timeout=300.0,
        server=server,
    )
    try:
        yield launcher
    finally:
        output = launcher.output_text()
        leftovers = launcher.stop()
        shutil.rmtree(cache, ignore_errors=True)
    assert not leftovers, f"processes outlived the launcher: {leftovers}\n{output[-3000:]}"
    assert _shm_segments() <= shm_before, "shared-memory segments left behind"
    # The launcher's private TMPDIR (ZMQ sockets, vllm_dist_* files, torch caches would land there).
    assert not launcher.temp_leftovers, f"files left in the temp directory: {launcher.temp_leftovers}"


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
