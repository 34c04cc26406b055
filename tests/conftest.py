"""Shared fixtures: real launchers (stand-in or vLLM workload) and the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.launcher_process import REPO, LauncherProcess


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
