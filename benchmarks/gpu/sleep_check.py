"""GPU check: sleeping models (``idle: sleep``) with the real vLLM on an NVIDIA GPU.

Measures, through the launcher's front door: a forked start to the first streamed token, the
instance's GPU memory awake and asleep (NVML, as the launcher samples it), and the first token
after a level-1 and a level-2 wake; and, with ``--cold``, a cold ``vllm serve`` to its first
token for the ratio. Targets (the issue): level-1 wake to first token ≤ 0.5 s and ≤ 0.02 × a cold
start; ≤ 1 GiB of GPU memory per sleeping instance. Prints PASS/FAIL lines and writes
``$OUT/sleepcheck.json``.

On a GPU machine with vLLM installed (e.g. the bundle of ../shared/gpucheck/build_vllm_bundle.sh
unpacked on PYTHONPATH), from the project root:

    python3 benchmarks/gpu/sleep_check.py --model /path/to/gpu-tiny [--cold]

Never run by CI: it needs the hardware. Without a GPU vLLM has no sleep mode and the front door
stops idle models instead (the stand-in tests cover that path).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.launcher_process import LauncherProcess, free_port, wait_until  # noqa: E402

FLAGS = "--max-model-len 256 --gpu-memory-utilization 0.15"


def first_token(base_url: str, model: str) -> float:
    """Seconds from the request to the first streamed token."""
    started = time.monotonic()
    body = {"model": model, "prompt": "Hello", "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=900) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{model}: {response.status_code} {response.read()[:300]!r}")
        for line in response.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.monotonic() - started
    raise RuntimeError(f"{model}: the stream ended without a token")


def cold_start(model: str) -> float:
    """A cold ``vllm serve`` (its own Python) to its first token."""
    port = free_port()
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                                "--port", str(port), "--served-model-name", "cold", *FLAGS.split()],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until(lambda: _healthy(port), 900, 0.25, "the cold vllm serve")
        return time.monotonic() - started + first_token(f"http://127.0.0.1:{port}", "cold")
    finally:
        process.terminate()
        process.wait(60)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def run(model: str, cold: bool) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="sleepcheck-"))
    models = {"models": {f"nap{level}": {"options": f"--model {model} {FLAGS}", "idle": "sleep", "sleep_level": level,
                                         "idle_timeout": 2, "share_gpu": True} for level in (1, 2)}}  # fmt: skip
    (workdir / "models.yaml").write_text(json.dumps(models))
    launcher = LauncherProcess(workload="vllm", env={"LAUNCHER_MODELS_FILE": str(workdir / "models.yaml")},
                               ready_timeout=900)  # fmt: skip
    result: dict[str, Any] = {"model": model, "flags": FLAGS}
    try:
        for level in (1, 2):
            name = f"nap{level}"
            result[f"{name}_forked_first_token_s"] = first_token(launcher.base_url, name)
            instance_id = launcher.client.get(f"/v2/vllm/models/{name}").json()["instance_id"]
            wait_until(lambda: launcher.state(instance_id).get("memory"), 30, what="a memory sample")
            result[f"{name}_gpu_bytes_awake"] = sum(launcher.state(instance_id)["memory"]["gpu_bytes"].values())
            wait_until(lambda: launcher.state(instance_id).get("sleeping"), 60, what=f"{name} asleep")
            time.sleep(4)  # two memory samples while asleep
            result[f"{name}_gpu_bytes_asleep"] = sum(launcher.state(instance_id)["memory"]["gpu_bytes"].values())
            result[f"{name}_wake_first_token_s"] = first_token(launcher.base_url, name)
            same = launcher.client.get(f"/v2/vllm/models/{name}").json()["instance_id"] == instance_id
            result[f"{name}_woken_not_restarted"] = same
    finally:
        launcher.stop()
    if cold:
        result["cold_first_token_s"] = cold_start(model)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local model directory")
    parser.add_argument("--cold", action="store_true", help="also time a cold vllm serve (for the ratio)")
    args = parser.parse_args()
    result = run(args.model, args.cold)
    checks = {
        "level-1 wake to first token ≤ 0.5 s": result["nap1_wake_first_token_s"] <= 0.5,
        "GPU memory asleep ≤ 1 GiB (level 1)": result["nap1_gpu_bytes_asleep"] <= 2**30,
        "GPU memory asleep ≤ 1 GiB (level 2)": result["nap2_gpu_bytes_asleep"] <= 2**30,
        "woken, not restarted": result["nap1_woken_not_restarted"] and result["nap2_woken_not_restarted"],
    }
    if "cold_first_token_s" in result:
        ratio = result["nap1_wake_first_token_s"] / result["cold_first_token_s"]
        result["wake_over_cold"] = ratio
        checks["level-1 wake ≤ 0.02 × a cold start"] = ratio <= 0.02
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'} {name}")
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "sleepcheck.json").write_text(json.dumps({**result, "checks": checks}, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
