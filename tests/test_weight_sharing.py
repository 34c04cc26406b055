"""Instances of one model share one copy of its weights (forkserver/zygotes.py, weight_sharing.py).

With the real vLLM and a random 0.5 B-parameter Llama (about 930 MiB of bf16 weights, built
locally): two instances fork from the model's zygote and take its weights (``weights_shared``
in their start phases); the second one's processes hold the weights in memory (RSS) without
owning them (USS), while an instance that opted out owns its copy; every instance answers the
same greedy completion. The zygote killed: running instances go on, the next instance gets a
new zygote. Deleted: no zygote, no process, no segment, no temp file left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import real_vllm_launcher
from tests.launcher_process import REPO, LauncherProcess, process_alive, start_ready, wait_until

pytestmark = pytest.mark.vllm

MIB = 2**20


@pytest.fixture(scope="module")
def half_b_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("models") / "llama-0.5b"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.random_llama", "0.5b", str(target)],
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(tmp_path_factory.mktemp("model-build-tmp"))},
        check=True,
        capture_output=True,
        timeout=600,
    )
    return target


def greedy_tokens(state: dict, model: Path) -> list[str]:
    """The instance's greedy completion of a fixed prompt, token by token."""
    response = httpx.post(
        f"http://127.0.0.1:{state['port']}/v1/completions",
        json={"model": str(model), "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0, "logprobs": 0},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return list(response.json()["choices"][0]["logprobs"]["tokens"])


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _zygotes(launcher: LauncherProcess) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.forkserver_pid()).children() if p.name() == "vllm-zygote"]


def test_instances_share_one_copy_of_the_weights_and_survive_its_holder(half_b_model: Path) -> None:
    weights = sum(path.stat().st_size for path in half_b_model.glob("*.safetensors"))
    with real_vllm_launcher() as launcher:
        forkserver = launcher.forkserver_pid()
        first = start_ready(launcher, "first", half_b_model)
        second = start_ready(launcher, "second", half_b_model)
        for state in (first, second):
            assert state["start_phases"]["weights_shared"] == 1.0, state["start_phases"]
            assert psutil.Process(state["pid"]).ppid() == forkserver  # the forkserver's, not the zygote's
        (zygote,) = _zygotes(launcher)
        assert second["start_phases"]["load"] < 1.0, second["start_phases"]  # nothing read, nothing repacked
        tokens = greedy_tokens(first, half_b_model)
        assert greedy_tokens(second, half_b_model) == tokens

        # The weights are in the second instance's memory but not its own: shared with the zygote.
        processes = _tree(second["pid"])
        engine_rss = max(p.memory_info().rss for p in processes)
        owned = sum(p.memory_full_info().uss for p in processes)
        assert engine_rss > 0.9 * weights, (engine_rss / MIB, weights / MIB)
        assert owned < 0.5 * weights, (owned / MIB, weights / MIB)

        # An instance that opts out loads (and owns) its copy, and computes the same tokens.
        alone = start_ready(launcher, "alone", half_b_model, env_vars={"LAUNCHER_SHARE_WEIGHTS": "0"})
        assert alone["start_phases"]["weights_shared"] == 0.0, alone["start_phases"]
        assert sum(p.memory_full_info().uss for p in _tree(alone["pid"])) > 0.9 * weights
        assert greedy_tokens(alone, half_b_model) == tokens
        assert launcher.client.delete("/v2/vllm/instances/alone").status_code == 200

        # The holder of the weights dies: no instance goes with it; the next instance gets a new one.
        os.kill(zygote.pid, signal.SIGKILL)
        wait_until(lambda: not process_alive(zygote.pid), 30, 0.1, "the zygote to go")
        for state in (first, second):
            assert launcher.state(state["instance_id"])["status"] == "running"
            assert greedy_tokens(state, half_b_model) == tokens
        third = start_ready(launcher, "third", half_b_model)
        assert third["start_phases"]["weights_shared"] == 1.0, third["start_phases"]
        (replacement,) = _zygotes(launcher)
        assert replacement.pid != zygote.pid
        assert greedy_tokens(third, half_b_model) == tokens

        # The last instance gone, its zygote goes too; nothing of any of them is left.
        assert launcher.client.delete("/v2/vllm/instances").status_code == 200
        wait_until(lambda: not _zygotes(launcher), 30, 0.1, "the zygote to go after the last instance")
        assert not psutil.Process(forkserver).children()
