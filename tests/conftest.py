"""Shared fixtures: real launchers (stand-in or vLLM workload) and the tiny model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.launcher_process import LauncherProcess


@pytest.fixture(scope="module")
def standin() -> Iterator[LauncherProcess]:
    """A launcher whose instances run the stand-in server; instances are deleted after each test."""
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_STOP_TIMEOUT": "2"})
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
    """A tiny real Llama model built locally (no hub)."""
    from tests.tiny_model import build_tiny_model

    cached = os.environ.get("LAUNCHER_TEST_TINY_MODEL")
    if cached:
        return build_tiny_model(Path(cached))
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")
