"""A fresh machine: the first instance with an empty vLLM cache starts no cold Python.

On a cache miss vLLM inspects the model class in ``python -m vllm.model_executor.models.registry``
(a cold import of vLLM and torch). The launcher runs that inspection in a fork of the instance
(forkserver/model_inspection.py), which marks the phase ``model_inspected`` in the instance's
log; vLLM then writes its ``modelinfos`` cache as usual, and the next instance finds it. (A model
whose weights are shared is inspected once, in its zygote: these instances opt out, to be seen.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from forkserver import phases
from tests.launcher_process import SERVE_FLAGS, LauncherProcess, free_port, wait_instance_healthy

pytestmark = pytest.mark.vllm


def _start(launcher: LauncherProcess, instance_id: str, model: Path) -> bytes:
    port = free_port()
    options = f"--model {model} --port {port} {SERVE_FLAGS}"
    response = launcher.create(instance_id, options=options, env_vars={"LAUNCHER_SHARE_WEIGHTS": "0"})
    assert response.status_code == 201, response.text
    wait_instance_healthy(launcher, instance_id, port)
    log = launcher.client.get(f"/v2/vllm/instances/{instance_id}/log").content
    assert launcher.client.delete(f"/v2/vllm/instances/{instance_id}").status_code == 200
    return log


def test_first_instance_on_an_empty_cache_inspects_the_model_in_a_fork(
    vllm_launcher: LauncherProcess, tiny_model: Path
) -> None:
    cache = Path(vllm_launcher.env["VLLM_CACHE_ROOT"])
    assert not (cache / "modelinfos").exists()  # empty, as on a new machine or after an upgrade

    first = _start(vllm_launcher, "first", tiny_model)
    marks = phases.read(first)
    assert "model_inspected" in marks, first.decode(errors="replace")[-3000:]
    assert marks["child_ready"] <= marks["model_inspected"] <= marks["engine_ready"]
    assert b"Error raised in subprocess" not in first
    cached = [path.name for path in (cache / "modelinfos").iterdir()]
    assert any("LlamaForCausalLM" in name for name in cached), cached  # vLLM wrote its cache itself

    second = _start(vllm_launcher, "second", tiny_model)
    assert "model_inspected" not in phases.read(second)  # a cache hit: nothing to inspect
