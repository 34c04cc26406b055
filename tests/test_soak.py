"""No leaks over time: hundreds of create → ready → delete cycles, and forkserver restarts.

Stand-in workload (the real-vLLM soak is benchmarks/soak.py). Every 50 cycles, with no instance
left, the API's and the forkserver's open fds, threads and children, the launcher's
/dev/shm segments and its temp directories are sampled; they must come back to where they
started (connection pools may hold a couple of fds: a small allowance, but no growth).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import psutil

from forkserver.leftovers import SEGMENT_PREFIXES
from tests.launcher_process import LauncherProcess, free_port, wait_until

CYCLES = 300
SAMPLE_EVERY = 50
RESTART_EVERY = 100
FD_ALLOWANCE = 3  # pooled keep-alive connections come and go


def _entries(path: Path) -> int:
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(path))


def _segments() -> list[str]:
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith(SEGMENT_PREFIXES))


def _sample(launcher: LauncherProcess) -> dict[str, Any]:
    api = psutil.Process(launcher.process.pid)
    forkserver = psutil.Process(launcher.forkserver_pid())
    return {
        "api_fds": api.num_fds(),
        "api_threads": api.num_threads(),
        "api_children": len(api.children()),
        "forkserver_fds": forkserver.num_fds(),
        "forkserver_threads": forkserver.num_threads(),
        "forkserver_children": len(forkserver.children()),
        "shm": _segments(),
        "runtime_entries": _entries(launcher.runtime_dir),
        "temp_entries": _entries(launcher.tmpdir),
        "log_files": len(list(launcher.log_dir.glob("*.log"))),
    }


def _cycle(launcher: LauncherProcess, number: int) -> None:
    instance_id = f"soak-{number}"
    created = launcher.create(instance_id, options=f"--model soak --port {free_port()} --host 127.0.0.1")
    assert created.status_code == 201, created.text
    wait_until(lambda: launcher.state(instance_id)["ready"], 30, 0.02, f"{instance_id} ready")
    assert launcher.client.delete(f"/v2/vllm/instances/{instance_id}").status_code == 200


def _restart_forkserver(launcher: LauncherProcess) -> None:
    old = launcher.forkserver_pid()
    os.kill(old, signal.SIGKILL)
    def replaced() -> bool:
        children = psutil.Process(launcher.process.pid).children()  # none while it is replaced
        return launcher.client.get("/health").status_code == 200 and [c.pid for c in children] not in ([], [old])

    wait_until(replaced, 60, 0.1, "a new forkserver")


def test_hundreds_of_cycles_and_restarts_leave_counts_flat() -> None:
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_STOP_TIMEOUT": "2"})
    try:
        for number in range(5):  # warm up: lazy imports, first connections
            _cycle(launcher, -1 - number)
        start = _sample(launcher)
        samples = [start]
        for number in range(1, CYCLES + 1):
            _cycle(launcher, number)
            if number % RESTART_EVERY == 0:
                _restart_forkserver(launcher)
                _cycle(launcher, -100 - number)  # the new forkserver has served one instance too
            if number % SAMPLE_EVERY == 0:
                samples.append(_sample(launcher))
        for sample in samples[1:]:
            assert sample["api_fds"] <= start["api_fds"] + FD_ALLOWANCE, samples
            for exact in ("api_threads", "api_children", "forkserver_fds", "forkserver_threads",
                          "forkserver_children", "shm", "runtime_entries", "temp_entries", "log_files"):  # fmt: skip
                assert sample[exact] == start[exact], (exact, samples)
        assert samples[-1]["api_fds"] <= samples[1]["api_fds"] + FD_ALLOWANCE  # no growth between samples
    finally:
        assert not launcher.stop()
    assert launcher.temp_leftovers == []
