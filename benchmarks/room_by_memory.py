"""Room by memory with the real vLLM: four models in turn under a host budget of 2.5 instances.

First one tiny instance is started alone and its footprint (PSS of its process tree) measured,
with the front door's estimate before it ran (weights + KV cache + a guessed overhead) and after
(the overhead learnt from it). Then a launcher with ``--memory-budget`` 2.5 x that footprint and
``--max-instances 10`` is asked for four models (the same tiny model under four names) in turn,
twice; after each answer the footprints of every running instance are added up. Last, a profile
declaring more than the budget is asked for: it must be refused at once (503
``insufficient_memory``), with nothing stopped.

    .venv/bin/python -m benchmarks.room_by_memory        # make bench-room

Writes ``benchmarks/results/room_by_memory.{json,md}``.
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

from benchmarks.common import SERVE_FLAGS, build_tiny_model, machine, write_results
from tests.launcher_process import VLLM_ENV, LauncherProcess, wait_until

MODELS = ("a", "b", "c", "d")
SETTLE = 5.0  # seconds for the memory samples (every 2 s) to see an instance whole


def _launcher(workdir: Path, models: dict[str, Any], footprints: Path, **env: str) -> LauncherProcess:
    path = workdir / f"models-{len(list(workdir.glob('models-*')))}.yaml"
    path.write_text(json.dumps({"idle_timeout": 0, "models": models}))
    return LauncherProcess(workload="vllm", env={**VLLM_ENV, "LAUNCHER_MODELS_FILE": str(path),
                                                 "LAUNCHER_FOOTPRINTS_FILE": str(footprints), **env})  # fmt: skip


def _running_total(launcher: LauncherProcess) -> tuple[int, int]:
    """The host bytes every running instance holds, and how many run."""
    instances = [i for i in launcher.client.get("/v2/vllm/instances").json()["instances"] if i["status"] == "running"]
    return sum((i.get("memory") or {}).get("host_bytes", 0) for i in instances), len(instances)


def run(model: Path, workdir: Path, rounds: int) -> dict[str, Any]:
    footprints = workdir / "footprints.json"
    options = f"--model {model} {' '.join(SERVE_FLAGS)}"
    probe = _launcher(workdir, {"probe": {"options": options}}, footprints)
    try:
        estimate_before = probe.client.get("/v2/vllm/models/probe").json()["memory_estimate"]["host_bytes"]
        started = probe.client.post("/v2/vllm/models/probe/start", timeout=600)
        assert started.status_code == 200, started.text
        time.sleep(SETTLE)
        instance = probe.state(started.json()["instance_id"])
        footprint = instance["memory"]["host_bytes"]
        wait_until(footprints.exists, 30, what="the measured footprint to be kept")
    finally:
        probe.stop()
    budget = int(2.5 * footprint)
    profiles: dict[str, Any] = {name: {"options": options} for name in MODELS}
    profiles["oversized"] = {"options": options, "memory": 3 * budget}
    launcher = _launcher(workdir, profiles, footprints, LAUNCHER_MEMORY_BUDGET=str(budget), LAUNCHER_MAX_INSTANCES="10")
    samples: list[dict[str, Any]] = []
    try:
        estimate_after = launcher.client.get("/v2/vllm/models/a").json()["memory_estimate"]["host_bytes"]
        for _ in range(rounds):
            for name in MODELS:
                answer = httpx.post(f"{launcher.base_url}/v1/completions", timeout=600,
                                    json={"model": name, "prompt": "Hello", "max_tokens": 4})  # fmt: skip
                assert answer.status_code == 200, answer.text
                time.sleep(SETTLE)
                total, running = _running_total(launcher)
                samples.append({"model": name, "total_bytes": total, "running": running})
                print(
                    f"  after {name}: {running} running, {total / 2**20:.0f} MiB of {budget / 2**20:.0f} MiB",
                    flush=True,
                )
        before = _running_total(launcher)[1]
        refused = httpx.post(f"{launcher.base_url}/v1/completions", timeout=60,
                             json={"model": "oversized", "prompt": "Hello", "max_tokens": 4})  # fmt: skip
        after = _running_total(launcher)[1]
    finally:
        launcher.stop()
    return {
        "footprint_bytes": footprint,
        "estimate_before_bytes": estimate_before,
        "estimate_after_bytes": estimate_after,
        "budget_bytes": budget,
        "samples": samples,
        "max_total_over_budget": max(sample["total_bytes"] for sample in samples) / budget,
        "max_running": max(sample["running"] for sample in samples),
        "oversized_status": refused.status_code,
        "oversized_code": refused.json().get("error", {}).get("code"),
        "oversized_message": refused.json().get("error", {}).get("message"),
        "running_before_after_refusal": [before, after],
    }


def table(result: dict[str, Any]) -> str:
    mib = 2**20
    footprint = result["footprint_bytes"]
    return "\n".join([
        "| measure | result | target |",
        "|---|---|---|",
        f"| one tiny instance (PSS of its process tree) | {footprint / mib:.0f} MiB | - |",
        f"| estimate before any instance ran (weights + KV cache + 512 MiB guessed) | "
        f"{result['estimate_before_bytes'] / mib:.0f} MiB ({result['estimate_before_bytes'] / footprint - 1:+.0%}) | - |",
        f"| estimate for a new profile, once one instance was measured | "
        f"{result['estimate_after_bytes'] / mib:.0f} MiB ({result['estimate_after_bytes'] / footprint - 1:+.0%}) | - |",
        f"| host budget | {result['budget_bytes'] / mib:.0f} MiB (2.5 instances) | - |",
        f"| most held at once, four models in turn | {result['max_total_over_budget']:.2f} × the budget | ≤ 1.10 × |",
        f"| most running at once | {result['max_running']} | ≥ 2 |",
        f"| a profile declaring 3 × the budget | {result['oversized_status']} `{result['oversized_code']}`, running "
        f"before/after {result['running_before_after_refusal'][0]}/{result['running_before_after_refusal'][1]} | "
        "refused at once, nothing stopped |",
    ])  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-room-"))
    try:
        result = run(build_tiny_model(workdir / "tiny"), workdir, args.rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = table(result)
    print(text)
    write_results("room_by_memory", {"machine": machine(), **result}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
