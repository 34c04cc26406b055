"""API overhead: what the launcher's own HTTP + bookkeeping costs, with the stand-in workload.

The stand-in (forkserver/standin.py) starts in microseconds and imports nothing, so every
millisecond measured here is the launcher's: Starlette routing, body validation, the round trip
to the forkserver, its option parsing and ``fork()``, and for deletes the stop and reap. The
issue's target is a create call (request → 201) with p50 < 20 ms.

In one run, against one real launcher + forkserver:

1. ``create`` / ``delete``: N sequential ``PUT /v2/vllm/instances/{id}`` (request → 201), each
   followed by its ``DELETE`` (request → 200).
2. ``/health`` baseline: C concurrent clients reading ``GET /health`` for D seconds. It is plain
   Starlette + uvicorn, so it shows the floor of any request (client included).
3. Status reads under churn: C concurrent clients reading ``GET /v2/vllm/instances/{id}`` and
   ``GET /v2/vllm/instances`` for D seconds while another task keeps creating and deleting
   instances. The ratio status read / health is the cost of the launcher's own logic.

Latencies include the client (httpx on asyncio, in this process), which shares the CPUs with the
launcher. Writes ``benchmarks/results/api_overhead.{json,md}``.

    .venv/bin/python -m benchmarks.api_overhead --creates 50 --duration 10 --clients 32
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.common import machine, summary, write_results
from tests.launcher_process import LauncherProcess, free_port

INSTANCES = "/v2/vllm/instances"
TARGET_CREATE_P50_MS = 20.0
RESIDENT_INSTANCES = 4  # stable instances the status readers ask about (churned ones come and go)
MAX_READS_PER_CLIENT = 1_000_000  # count bound on top of the time bound
MAX_CHURN_CYCLES = 100_000
HTTP_TIMEOUT = 30.0


@dataclass
class Samples:
    """Latencies (ms) of one kind of request, and the status codes (or errors) seen."""

    latencies_ms: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)

    def add(self, started: float, code: str) -> None:
        self.latencies_ms.append((time.perf_counter() - started) * 1000)
        self.codes[code] += 1

    def errors(self, expected: str) -> int:
        return sum(count for code, count in self.codes.items() if code != expected)

    def as_json(self, expected: str, elapsed_s: float | None = None) -> dict[str, Any]:
        result: dict[str, Any] = {
            "expected_code": expected,
            "codes": dict(self.codes),
            "errors": self.errors(expected),
            "summary_ms": summary(self.latencies_ms) if self.latencies_ms else None,
            # Raw samples only for the small series: the load series run to thousands.
            "raw_ms": [round(value, 3) for value in self.latencies_ms] if len(self.latencies_ms) <= 200 else None,
        }
        if elapsed_s:
            result["per_second"] = len(self.latencies_ms) / elapsed_s
        return result


def _options(port: int) -> dict[str, str]:
    return {"options": f"--model standin --port {port}"}


# --- 1. sequential create / delete ---------------------------------------------------------


def sequential_creates(client: httpx.Client, count: int) -> tuple[Samples, Samples]:
    """Create then delete, one at a time: the latency of an idle launcher."""
    creates, deletes = Samples(), Samples()
    for number in range(count):
        instance_id = f"seq-{number}"
        started = time.perf_counter()
        response = client.put(f"{INSTANCES}/{instance_id}", json=_options(free_port()))
        creates.add(started, str(response.status_code))
        if response.status_code != 201:
            print(f"create {instance_id}: {response.status_code} {response.text}", file=sys.stderr)
            continue
        started = time.perf_counter()
        response = client.delete(f"{INSTANCES}/{instance_id}")
        deletes.add(started, str(response.status_code))
    return creates, deletes


# --- 2 and 3. concurrent readers, churn ----------------------------------------------------


async def _timed_get(client: httpx.AsyncClient, path: str, samples: Samples) -> None:
    started = time.perf_counter()
    try:
        response = await client.get(path)
    except httpx.HTTPError as error:  # counted, not fatal: one failure must not hide the rest
        samples.add(started, f"error:{type(error).__name__}")
        return
    samples.add(started, str(response.status_code))


async def _reader(base_url: str, paths: list[str], deadline: float, by_path: dict[str, Samples]) -> None:
    """One client: cycle through ``paths`` until the deadline (or the count bound)."""
    # One client object (one keep-alive connection) per task, like independent callers.
    async with httpx.AsyncClient(base_url=base_url, timeout=HTTP_TIMEOUT) as client:
        for number in range(MAX_READS_PER_CLIENT):
            if time.perf_counter() >= deadline:
                return
            path = paths[number % len(paths)]
            await _timed_get(client, path, by_path[path])


async def _churn(base_url: str, deadline: float, creates: Samples, deletes: Samples) -> None:
    """Create and delete instances back to back until the deadline, so readers see a moving state."""
    async with httpx.AsyncClient(base_url=base_url, timeout=HTTP_TIMEOUT) as client:
        for number in range(MAX_CHURN_CYCLES):
            if time.perf_counter() >= deadline:
                return
            instance_id = f"churn-{number}"
            started = time.perf_counter()
            response = await client.put(f"{INSTANCES}/{instance_id}", json=_options(free_port()))
            creates.add(started, str(response.status_code))
            if response.status_code != 201:
                print(f"churn create {instance_id}: {response.status_code} {response.text}", file=sys.stderr)
                continue
            started = time.perf_counter()
            response = await client.delete(f"{INSTANCES}/{instance_id}")
            deletes.add(started, str(response.status_code))


async def concurrent_reads(
    base_url: str, paths: list[str], clients: int, duration: float, churn: bool
) -> tuple[dict[str, Samples], Samples, Samples, float]:
    """``clients`` readers (and optionally the churn task) for ``duration`` seconds."""
    by_path = {path: Samples() for path in paths}
    creates, deletes = Samples(), Samples()
    started = time.perf_counter()
    deadline = started + duration
    tasks = [_reader(base_url, paths, deadline, by_path) for _ in range(clients)]
    if churn:
        tasks.append(_churn(base_url, deadline, creates, deletes))
    await asyncio.gather(*tasks)
    return by_path, creates, deletes, time.perf_counter() - started


# --- report --------------------------------------------------------------------------------


def _row(name: str, data: dict[str, Any]) -> str:
    stats = data["summary_ms"]
    if stats is None:
        return f"| {name} | 0 | - | - | - | - | - | - | {data['errors']} |"

    def cell(key: str) -> str:
        return f"{stats[key]:.2f}" if key in stats else "-"  # p90/p99 need >= 10 samples

    rate = f"{data['per_second']:.0f}" if "per_second" in data else "-"
    return (
        f"| {name} | {stats['n']} | {cell('median')} | {cell('p90')} | {cell('p99')} | {cell('min')} "
        f"| {cell('max')} | {rate} | {data['errors']} |"
    )


def _table(results: dict[str, Any]) -> str:
    measured = results["measurements"]
    args = results["args"]
    lines = [
        "| measurement | n | p50 ms | p90 ms | p99 ms | min ms | max ms | per s | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(name, data) for name, data in measured.items()]
    create_p50 = measured["create (sequential)"]["summary_ms"]["median"]
    verdict = "met" if create_p50 < TARGET_CREATE_P50_MS else "NOT met"
    lines += [
        "",
        f"Create call p50 {create_p50:.2f} ms: target < {TARGET_CREATE_P50_MS:.0f} ms {verdict}.",
        f"Status read p50 / `/health` p50: {results['ratio_status_to_health_p50']:.2f} "
        "(status reads ran under churn, `/health` without).",
        f"{args['clients']} clients (httpx.AsyncClient each, one asyncio loop), "
        f"{args['duration']:.0f} s per load phase, "
        f"{args['creates']} sequential creates; {RESIDENT_INSTANCES} resident instances read by id.",
        "",
        f"Machine: {results['machine']['platform']}, {results['machine']['cpus']} CPUs, "
        f"Python {results['machine']['python']}, {results['machine']['date']}.",
        "Reproduce: `make bench-api` (or `.venv/bin/python -m benchmarks.api_overhead`).",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace, launcher: LauncherProcess) -> dict[str, Any]:
    """All three measurements against one launcher; the raw samples and their summaries."""
    creates, deletes = sequential_creates(launcher.client, args.creates)
    measured: dict[str, Any] = {
        "create (sequential)": creates.as_json("201"),
        "delete (sequential)": deletes.as_json("200"),
    }

    health, _, _, elapsed = asyncio.run(
        concurrent_reads(launcher.base_url, ["/health"], args.clients, args.duration, churn=False)
    )
    measured["GET /health (baseline)"] = health["/health"].as_json("200", elapsed)

    resident = [f"resident-{number}" for number in range(RESIDENT_INSTANCES)]
    for instance_id in resident:
        response = launcher.create(instance_id, **_options(free_port()))
        if response.status_code != 201:
            raise RuntimeError(f"resident {instance_id}: {response.status_code} {response.text}")
    # Alternate one-instance and list reads, so each client does as many of one as of the other.
    paths = [path for instance_id in resident for path in (f"{INSTANCES}/{instance_id}", INSTANCES)]
    reads, churn_creates, churn_deletes, elapsed = asyncio.run(
        concurrent_reads(launcher.base_url, paths, args.clients, args.duration, churn=True)
    )
    by_id = Samples()
    for instance_id in resident:
        one = reads[f"{INSTANCES}/{instance_id}"]
        by_id.latencies_ms += one.latencies_ms
        by_id.codes += one.codes
    all_reads = Samples(by_id.latencies_ms + reads[INSTANCES].latencies_ms, by_id.codes + reads[INSTANCES].codes)
    measured["GET /instances/{id} (churn)"] = by_id.as_json("200", elapsed)
    measured["GET /instances (churn)"] = reads[INSTANCES].as_json("200", elapsed)
    measured["status reads, all (churn)"] = all_reads.as_json("200", elapsed)
    measured["create (during churn)"] = churn_creates.as_json("201", elapsed)
    measured["delete (during churn)"] = churn_deletes.as_json("200", elapsed)

    status_p50 = measured["status reads, all (churn)"]["summary_ms"]["median"]
    health_p50 = measured["GET /health (baseline)"]["summary_ms"]["median"]
    return {"measurements": measured, "ratio_status_to_health_p50": status_p50 / health_p50}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--creates", type=int, default=50, help="sequential create+delete pairs")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each concurrent phase")
    parser.add_argument("--clients", type=int, default=32, help="concurrent reading clients")
    args = parser.parse_args()

    launcher = LauncherProcess(workload="standin")
    try:
        results = run(args, launcher)
    finally:
        leftovers = launcher.stop()
        if leftovers:
            print(f"warning: processes outlived the launcher (killed): {leftovers}", file=sys.stderr)

    results = {"machine": machine(), "args": vars(args), "leftover_pids": leftovers, **results}
    table = _table(results)
    print(table)
    write_results("api_overhead", results, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
