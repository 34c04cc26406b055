"""Density: how many tiny instances fit at once with the default settings, and PSS per instance.

Creates instances one after another through the API (each must reach ``/health`` 200 and
answer a completion) until ``--max`` is reached, an instance fails to start, or available
memory would drop under ``--reserve-gib``. Reports the count, the PSS of each instance's process
tree, the forkserver's PSS and the memory the machine had left. Writes
``benchmarks/results/density.{json,md}``.

    .venv/bin/python -m benchmarks.density --max 64
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import (
    SERVE_FLAGS,
    build_tiny_model,
    complete,
    healthy,
    machine,
    summary,
    tree_pss_mib,
    write_results,
)
from tests.launcher_process import VLLM_ENV, LauncherProcess, free_port, wait_until

# Launcher defaults, except the instance limit (32 by default): this measures the machine.
BASE_ENV = {**VLLM_ENV, "LAUNCHER_MAX_INSTANCES": "0"}


def _start(launcher: LauncherProcess, model: Path, index: int) -> dict[str, Any]:
    port = free_port()
    instance_id = f"dense-{index}"
    started = time.time()
    response = launcher.create(instance_id, options=" ".join(["--model", str(model), "--port", str(port), *SERVE_FLAGS]))
    if response.status_code != 201:
        raise RuntimeError(f"create answered {response.status_code}: {response.text}")

    def ready() -> bool:
        if launcher.state(instance_id)["status"] != "running":
            raise RuntimeError(f"{instance_id} stopped while starting")
        return healthy(port)

    wait_until(ready, 300, 0.1, instance_id)
    if not complete(port, str(model)):
        raise RuntimeError(f"{instance_id} did not complete")
    return {"instance_id": instance_id, "port": port, "start_s": time.time() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max", type=int, default=64, help="stop after this many instances")
    parser.add_argument("--reserve-gib", type=float, default=3.0, help="stop before available memory drops below this")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-density-"))
    launcher: LauncherProcess | None = None
    started: list[dict[str, Any]] = []
    stop_reason = f"reached --max {args.max}"
    try:
        model = build_tiny_model(workdir / "tiny-llama")
        launcher = LauncherProcess(workload="vllm", env=BASE_ENV)
        for index in range(args.max):
            if psutil.virtual_memory().available / 2**30 < args.reserve_gib + 1.0:
                stop_reason = f"available memory under {args.reserve_gib + 1.0:.1f} GiB"
                break
            try:
                started.append(_start(launcher, model, index))
            except (RuntimeError, AssertionError) as exc:
                stop_reason = f"instance {index} failed: {exc}"
                break
            print(f"{len(started)} instances up (last took {started[-1]['start_s']:.1f}s)", flush=True)
        time.sleep(2)  # let the last one settle before measuring
        for item in started:
            item["pss_mib"] = tree_pss_mib(launcher.state(item["instance_id"])["pid"])
            item["still_healthy"] = healthy(item["port"])
        forkserver_pss = psutil.Process(launcher.forkserver_pid()).memory_full_info().pss / 2**20
        available = psutil.virtual_memory().available / 2**30
    finally:
        if launcher is not None:
            leftovers = launcher.stop()
            if leftovers:
                print(f"warning: processes outlived the launcher: {leftovers}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)

    pss = summary([item["pss_mib"] for item in started]) if started else {}
    results = {
        "machine": machine(),
        "instances": len(started),
        "all_healthy": all(item["still_healthy"] for item in started),
        "stop_reason": stop_reason,
        "pss_mib_per_instance": pss,
        "forkserver_pss_mib": forkserver_pss,
        "available_gib_at_end": available,
        "start_s": summary([item["start_s"] for item in started]) if started else {},
        "raw": started,
    }
    table = "\n".join(
        [
            "| instances at once | all healthy | PSS per instance MiB (median, min-max) | forkserver PSS MiB | memory left GiB | start s (median, max) |",
            "|---|---|---|---|---|---|",
            f"| {len(started)} | {results['all_healthy']} | {pss.get('median', 0):.0f} ({pss.get('min', 0):.0f}-{pss.get('max', 0):.0f}) "
            f"| {forkserver_pss:.0f} | {available:.1f} | {results['start_s'].get('median', 0):.1f}, {results['start_s'].get('max', 0):.1f} |",
            "",
            f"Stopped because: {stop_reason}. Machine: {results['machine']['platform']}, {results['machine']['cpus']} CPUs, "
            f"{results['machine']['memory_gib']} GiB, {results['machine']['date']}.",
            "Reproduce: `make bench-density` (or `.venv/bin/python -m benchmarks.density --max 64`).",
        ]
    )
    print(table)
    write_results("density", results, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
