"""One compatibility step for vLLM on CPU: keep its helper processes forked, not spawned.

On CUDA, vLLM forks its EngineCore (and workers) by default as long as CUDA was not
initialised in the parent, and the forkserver never initialises CUDA: nothing to do there.

On CPU, ``CpuPlatform.check_and_update_config`` (vllm/platforms/cpu.py) sets
``VLLM_WORKER_MULTIPROC_METHOD=spawn`` unconditionally and forces the multiprocess executor.
A spawned EngineCore and Worker re-import vLLM and torch from scratch, which throws away the
preload (measured here: 15 s to healthy instead of 2-3 s). This module wraps that one method,
in the instance child only, so that after it runs:

- ``VLLM_WORKER_MULTIPROC_METHOD`` is back to what the instance asked for (default ``fork``),
  so the EngineCore is a fork of the already-initialised instance process;
- optionally, a single-process model keeps vLLM's in-process ("uni") executor, so the model
  runs inside the EngineCore instead of one more Worker process (less memory, faster start).

Switch it off with the launcher settings ``--no-fork-engine`` / ``--no-in-process-worker``,
or per instance by setting ``VLLM_WORKER_MULTIPROC_METHOD=spawn`` in ``env_vars``.
"""

from __future__ import annotations

import os
from typing import Any


def keep_helpers_forked(*, in_process_worker: bool) -> bool:
    """Install the wrapper if the current platform is vLLM's CPU platform; True if installed."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    platform_class = type(current_platform)
    original = platform_class.check_and_update_config.__func__  # type: ignore[attr-defined]
    wanted_method = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD", "fork")

    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        parallel = vllm_config.parallel_config
        backend_before = parallel.distributed_executor_backend
        original(cls, vllm_config)
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = wanted_method
        if (
            in_process_worker
            and backend_before == "uni"
            and parallel.distributed_executor_backend == "mp"
            and parallel.world_size == 1
        ):
            parallel.distributed_executor_backend = "uni"

    platform_class.check_and_update_config = classmethod(check_and_update_config)  # type: ignore[method-assign,assignment]
    return True
