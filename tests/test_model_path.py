"""``--model PATH`` checked in the forkserver before the fork (forkserver/model_path.py).

A container run under an arbitrary UID (OpenShift's) met a model written mode 0600 by another
user: vLLM failed in the instance with ``FileNotFoundError: ... model.safetensors``, a file that
exists. The check, run as the instances' user, says "permission denied" and names the file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from forkserver.model_path import local_model_problem
from tests.launcher_process import REPO

NOBODY = 65534


def _model(folder: Path, weights_mode: int = 0o644) -> Path:
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").chmod(0o644)
    (folder / "model.safetensors").chmod(weights_mode)
    return folder


def _problems_as(uid: int, models: list[str]) -> list[str | None]:
    """local_model_problem for each path, in a Python that dropped to ``uid`` after its imports."""
    script = textwrap.dedent(
        f"""
        import json, os, sys
        from forkserver.model_path import local_model_problem
        os.setgroups([]); os.setgid({uid}); os.setuid({uid})
        print(json.dumps([local_model_problem(model) for model in json.loads(sys.argv[1])]))
        """
    )
    result = subprocess.run([sys.executable, "-c", script, json.dumps(models)], cwd=REPO, capture_output=True,
                            text=True, check=True, timeout=60)  # fmt: skip
    problems: list[str | None] = json.loads(result.stdout)
    return problems


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to check as another user")
def test_a_model_another_user_cannot_read_is_permission_denied_naming_the_path() -> None:
    tmp_path = Path(tempfile.mkdtemp(prefix="model-path-"))  # pytest's tmp_path is root's alone
    try:
        _check_as_nobody(tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def _check_as_nobody(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    readable = _model(tmp_path / "readable")
    private_weights = _model(tmp_path / "private-weights", weights_mode=0o600)
    private_folder = _model(tmp_path / "private-folder")
    private_folder.chmod(0o700)
    behind = tmp_path / "closed"
    behind.mkdir(mode=0o700)
    _model(behind / "model")
    problems = _problems_as(NOBODY, [str(readable), str(private_weights), str(private_folder), str(behind / "model")])
    assert problems[0] is None
    for problem, path in zip(problems[1:], [private_weights / "model.safetensors", private_folder, behind / "model"]):
        assert problem is not None and f"permission denied: {path} is not readable" in problem, problem
        assert f"(uid {NOBODY})" in problem
    assert local_model_problem(str(private_weights)) is None  # root reads everything


def test_a_readable_model_passes(tmp_path: Path) -> None:
    assert local_model_problem(str(_model(tmp_path / "model"))) is None


@pytest.mark.vllm  # torch builds it
def test_the_tiny_model_is_world_readable(tiny_model: Path) -> None:
    assert tiny_model.stat().st_mode & 0o777 == 0o755
    for entry in tiny_model.iterdir():
        assert entry.stat().st_mode & 0o777 == 0o644, entry
