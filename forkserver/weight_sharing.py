"""One copy of a model's weights for every instance of it: loaded once in a zygote, grafted after fork.

Why not map the safetensors file (or a /dev/shm copy) into each instance instead: on CPU,
``process_weights_after_loading`` repacks every linear layer's weight into a oneDNN buffer
(``dispatch_cpu_unquantized_gemm``) and frees the parameter. Measured on a random 1.1 B Llama
(``benchmarks/load_breakdown.py``): after the load the parameters hold 4 MiB of the file's
2104 MiB, and the repacking alone takes 2-3 s. The memory worth sharing is the repacked one,
and it is private to the process that made it. So a *zygote* (forkserver/zygotes.py), a fork
of the forkserver, loads and repacks the model once, and the model's instances are forked from
it: every page of the weights is shared copy-on-write, and nothing ever writes them.

In the instance, vLLM builds its model as usual, under the instance's own configuration (its
attention layers, compile wrappers, KV cache are its own), and only the result of the load is
taken from the zygote's copy, module by module: the parameters, the buffers the load changed,
and the attributes the load and post-processing added or replaced (on CPU: ``cpu_linear``,
the closure over the oneDNN handle). Before anything is taken, the two module trees must match:
the same names, the same classes, the same parameter shapes before loading; if not, vLLM
loads the weights itself (never a wrong model: a slower start).

This module is vLLM-specific; forkserver/zygotes.py runs the processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Options that change nothing about the weights: instances that differ only in these share.
# The structural check at graft time is the safety net for anything wrongly listed here.
PER_INSTANCE_OPTIONS = frozenset(
    {
        "port",
        "host",
        "served_model_name",
        "api_key",
        "max_model_len",
        "kv_cache_memory_bytes",
        "gpu_memory_utilization",
        "max_num_seqs",
        "max_num_batched_tokens",
        "disable_log_requests",
        "enable_log_requests",
        "disable_log_stats",
        "disable_uvicorn_access_log",
        "uvicorn_log_level",
        "model_tag",  # the positional model: same as --model once parsed
        "seed",
    }
)
_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules"})


@dataclass
class SharedModel:
    """A loaded model as the zygote made it, and what its load changed (per module name)."""

    model: Any
    model_path: str
    dtype: str
    shapes_before: dict[str, dict[str, tuple[int, ...]]]
    changed_attributes: dict[str, list[str]]
    removed_attributes: dict[str, list[str]]
    changed_buffers: dict[str, list[str]]
    torch_threads: int
    load_seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


# Set in the zygote once its model is loaded: every instance forked from it inherits it.
INHERITED: SharedModel | None = None


def share_key(namespace: Any, env: Mapping[str, str], *, fork_engine: bool, in_process_worker: bool) -> str | None:
    """What instances must have in common to share one zygote; None when this one cannot share.

    Sharing needs the model to be loaded in a process forked from the instance (vLLM's CPU
    platform with the EngineCore forked and the model inside it), one process per model (no
    tensor, pipeline or data parallelism), and nothing that post-processes weights or KV scales
    in ways the graft does not follow (quantization, a quantized KV cache, a draft model).
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or not fork_engine or not in_process_worker:
        return None
    if env.get("VLLM_WORKER_MULTIPROC_METHOD", "fork") != "fork":
        return None
    options = vars(namespace)
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        if int(options.get(name) or 1) != 1:
            return None
    if options.get("quantization") or options.get("speculative_config") or options.get("enable_lora"):
        return None
    if str(options.get("kv_cache_dtype") or "auto") != "auto":
        return None
    if str(options.get("load_format") or "auto") in ("dummy",):
        return None
    wanted = {name: repr(value) for name, value in sorted(options.items()) if name not in PER_INSTANCE_OPTIONS}
    files = model_files_identity(str(options.get("model") or ""))
    return json.dumps({"options": wanted, "env": dict(sorted(env.items())), "files": files}, sort_keys=True)


def model_files_identity(model: str) -> list[list[object]]:
    """What the model folder's files are now (name, inode, size, mtime): a checkpoint written again
    in place, or a link pointed elsewhere, is another key, so a zygote never serves stale weights."""
    try:
        folder = os.path.realpath(model)
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name) if os.path.isdir(folder) else []
    except OSError:
        return []
    identity: list[list[object]] = [[folder]]
    for entry in entries:
        try:
            stat = entry.stat()  # follows links: the file the loader will read
        except OSError:
            continue
        if entry.is_file():
            identity.append([entry.name, stat.st_ino, stat.st_size, stat.st_mtime_ns])
    return identity


def _snapshot(model: Any) -> dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, tuple[int, ...]]]]:
    """Per module: its attributes (the objects themselves), copies of its buffers, its parameter shapes."""
    import torch

    snapshot = {}
    for name, module in model.named_modules():
        attributes = {key: value for key, value in module.__dict__.items() if key not in _MODULE_INTERNALS}
        buffers = {key: (value, value.detach().clone()) for key, value in module._buffers.items() if isinstance(value, torch.Tensor)}
        shapes = {key: tuple(value.shape) for key, value in module._parameters.items() if value is not None}
        snapshot[name] = (attributes, buffers, shapes)
    return snapshot


def load_for_sharing(namespace: Any, tmpdir: str) -> SharedModel:
    """In the zygote: load the model as vLLM's CPU worker would, record what the load changed.

    Builds the engine configuration from the instance's options, brings up a one-process
    ``torch.distributed`` group (vLLM's layers ask it for their rank), loads, then takes the
    group down again so that no thread or socket of it is left for the forks.
    """
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        ensure_model_parallel_initialized,
        init_distributed_environment,
    )
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.usage.usage_lib import UsageContext

    _accelerator_calls_to_noop()  # what vLLM's CPU model runner does before it loads
    began = time.perf_counter()
    config = AsyncEngineArgs.from_cli_args(namespace).create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    model_config = config.model_config
    loader = get_model_loader(config.load_config)
    recorded: dict[str, Any] = {}
    load_weights = loader.load_weights

    def load_weights_recorded(model: Any, *args: Any, **kwargs: Any) -> Any:
        recorded["before"] = _snapshot(model)
        return load_weights(model, *args, **kwargs)

    loader.load_weights = load_weights_recorded  # type: ignore[method-assign]
    init_file = os.path.join(tmpdir, "dist-init")
    with set_current_vllm_config(config):
        init_distributed_environment(
            world_size=1, rank=0, distributed_init_method=f"file://{init_file}", local_rank=0, backend="gloo"
        )
        try:
            ensure_model_parallel_initialized(1, 1)
            model = loader.load_model(vllm_config=config, model_config=model_config)
        finally:
            destroy_model_parallel()  # type: ignore[no-untyped-call]
            destroy_distributed_environment()  # type: ignore[no-untyped-call]
            with contextlib.suppress(OSError):
                os.unlink(init_file)
    before = recorded["before"]
    changed: dict[str, list[str]] = {}
    removed: dict[str, list[str]] = {}
    changed_buffers: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        attributes, buffers, _ = before.get(name, ({}, {}, {}))
        now = {key: value for key, value in module.__dict__.items() if key not in _MODULE_INTERNALS}
        changed[name] = [key for key, value in now.items() if key not in attributes or attributes[key] is not value]
        removed[name] = [key for key in attributes if key not in now]
        changed_buffers[name] = [
            key
            for key, value in module._buffers.items()
            if isinstance(value, torch.Tensor)
            and (
                key not in buffers
                or buffers[key][0] is not value
                or buffers[key][1].shape != value.shape
                or not torch.equal(buffers[key][1], value)
            )
        ]
    return SharedModel(
        model=model,
        model_path=str(model_config.model),
        dtype=str(model_config.dtype),
        shapes_before={name: shapes for name, (_, _, shapes) in before.items()},
        changed_attributes=changed,
        removed_attributes=removed,
        changed_buffers=changed_buffers,
        torch_threads=torch.get_num_threads(),
        load_seconds=time.perf_counter() - began,
    )


def _accelerator_calls_to_noop() -> None:
    with contextlib.suppress(ImportError, AttributeError):
        from vllm.v1.worker import cpu_model_runner

        cpu_model_runner._set_torch_accelerator_to_noop()


def release_openmp() -> bool:
    """Free every GNU OpenMP thread pool (``omp_pause_resource_all``): after a fork, a child of a
    process whose pool exists hangs in its first parallel region (libgomp is not fork-safe).
    Wheels bundle their own libgomp (torch's, sentencepiece's): each is released."""
    released = True
    for path in _loaded_libraries("libgomp"):
        try:
            released = int(ctypes.CDLL(path).omp_pause_resource_all(1)) == 0 and released  # omp_pause_hard
        except (OSError, AttributeError):
            released = False
    return released  # no libgomp: nothing to release (Intel's OpenMP handles fork itself)


def openmp_releasable() -> bool:
    """Whether :func:`release_openmp` can work here (else the zygote loads on one thread)."""
    for path in _loaded_libraries("libgomp"):
        try:
            if not hasattr(ctypes.CDLL(path), "omp_pause_resource_all"):
                return False
        except OSError:
            return False
    return True


MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25  # Linux 6.1
HUGE_PAGE = 2 << 20


def collapse_into_huge_pages(min_bytes: int = 4 << 20, min_resident: float = 0.9) -> int:
    """Back the zygote's mostly-resident private memory (the repacked weights) with 2 MiB pages.

    Every instance is a fork of the zygote, and its EngineCore a fork of the instance: a fork
    copies the page tables, 4 KiB entry by entry, so a 2 GiB model made each fork 60-200 ms
    here; with huge pages 15-30 ms, whatever the size. Pages stay shared copy-on-write (a write
    to one splits it and copies 4 KiB). Best effort: returns the bytes collapsed (0 where the
    kernel cannot: before 6.1, or transparent huge pages set to never).

    Off by default (``LAUNCHER_ZYGOTE_HUGE_PAGES=1`` in the model's ``env_vars`` turns it on):
    measured on the 1.1 B model, the instance's ``fork`` phase went from 0.21 to 0.06 s, but the
    collapse (the kernel copies every page, compacting memory for huge ones) took 6.6 s in the
    zygote on this busy 2-CPU machine and filled 290 MiB of holes in partly used regions.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    collapsed = 0
    for start, end in _resident_private_regions(min_bytes, min_resident):
        start, end = (start + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1), end & ~(HUGE_PAGE - 1)
        if end - start < HUGE_PAGE:
            continue
        if libc.madvise(start, end - start, MADV_HUGEPAGE) == 0 and libc.madvise(start, end - start, MADV_COLLAPSE) == 0:
            collapsed += end - start
    return collapsed


def _resident_private_regions(min_bytes: int, min_resident: float) -> list[tuple[int, int]]:
    regions: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    anonymous = False
    with contextlib.suppress(OSError), open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(None, 5)
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's first line
                low, high = (int(part, 16) for part in head[0].split("-"))
                name = head[5].strip() if len(head) > 5 else ""
                anonymous = head[1] == "rw-p" and name in ("", "[heap]")
                current = (low, high) if anonymous and high - low >= min_bytes else None
            elif current is not None and line.startswith("Rss:"):
                if int(line.split()[1]) * 1024 >= min_resident * (current[1] - current[0]):
                    regions.append(current)
                current = None
    return regions


def _loaded_libraries(stem: str) -> list[str]:
    found: list[str] = []
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rsplit(None, 1)[-1] if "/" in line else ""
            if stem in os.path.basename(path) and path not in found:
                found.append(path)
    return found


class GraftError(RuntimeError):
    """The instance's model does not match the zygote's: vLLM loads the weights itself."""


def graft(model: Any, shared: SharedModel) -> None:
    """Give ``model`` (built, not loaded) the zygote's loaded weights; check everything first."""
    theirs = dict(shared.model.named_modules())
    mine = list(model.named_modules())
    if [name for name, _ in mine] != list(theirs):
        raise GraftError("the module trees differ")
    for name, module in mine:
        source = theirs[name]
        if type(source) is not type(module):
            raise GraftError(f"{name or 'the model'} is a {type(module).__name__} here, {type(source).__name__} there")
        shapes = {key: tuple(value.shape) for key, value in module._parameters.items() if value is not None}
        if shapes != shared.shapes_before.get(name):
            raise GraftError(f"{name or 'the model'}: parameter shapes differ")
        for key in shared.changed_buffers.get(name, ()):
            mine_buffer = module._buffers.get(key)
            if mine_buffer is not None and tuple(mine_buffer.shape) != tuple(source._buffers[key].shape):
                raise GraftError(f"{name}.{key}: buffer shapes differ")
    for name, module in mine:
        source = theirs[name]
        module._parameters.clear()
        module._parameters.update(source._parameters)
        for key in shared.changed_buffers.get(name, ()):
            module._buffers[key] = source._buffers[key]
        for key in shared.changed_attributes.get(name, ()):
            module.__dict__[key] = source.__dict__[key]
        for key in shared.removed_attributes.get(name, ()):
            module.__dict__.pop(key, None)


def install_load_hook(mark: Callable[..., None]) -> None:
    """In the instance: vLLM's model load takes the inherited weights when it can, and is timed.

    Marks ``load_start``/``load_done`` around every model load (shared or not) and
    ``weights_shared`` when the weights came from the zygote.
    """
    from vllm.model_executor.model_loader import base_loader

    original = base_loader.BaseModelLoader.load_model

    def load_model(self: Any, vllm_config: Any, model_config: Any, *args: Any, **kwargs: Any) -> Any:
        mark("load_start")
        try:
            shared = INHERITED
            if shared is not None and _same_model(shared, model_config):
                prefix = kwargs.get("prefix", args[0] if args else "")
                model, grafted = _build_and_graft(self, vllm_config, model_config, shared, prefix)
                if grafted:
                    mark("weights_shared")
                return model
            return original(self, vllm_config, model_config, *args, **kwargs)
        finally:
            mark("load_done")

    base_loader.BaseModelLoader.load_model = load_model  # type: ignore[method-assign]


def _same_model(shared: SharedModel, model_config: Any) -> bool:
    return shared.model_path == str(model_config.model) and shared.dtype == str(model_config.dtype)


def _build_and_graft(loader: Any, vllm_config: Any, model_config: Any, shared: SharedModel, prefix: str = "") -> tuple[Any, bool]:
    """Build the instance's model; graft the zygote's weights into it, or load them if they do not fit."""
    import sys

    import torch
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    device = torch.device(vllm_config.load_config.device or vllm_config.device_config.device)
    with set_default_torch_dtype(model_config.dtype):
        with device:
            create = getattr(loader, "create_model", None)
            if create is not None:
                model = create(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
            else:  # releases before create_model existed
                from vllm.model_executor.model_loader.utils import initialize_model

                model = initialize_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
        try:
            graft(model, shared)
            return model.eval(), True
        except GraftError as exc:  # nothing was changed yet: load into the model built above
            print(f"launcher: the zygote's weights do not fit this instance ({exc}); loading them", file=sys.stderr, flush=True)
        loader.load_weights(model, model_config)
        process_weights_after_loading(model, model_config, device)
    return model.eval(), False


def quiet_progress_bars() -> None:
    """tqdm starts a monitor thread with its first bar (vLLM's load shows one): not in a zygote,
    whose forks would inherit a thread's locks without the thread."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.monitor_interval = 0


def forget_progress_bar_lock() -> None:
    """tqdm's write lock holds a multiprocessing lock (a semaphore in /dev/shm): every fork of the
    zygote would share it, and a sibling killed while holding it would hang the others' bars.
    Dropped here, each instance makes its own on its first bar."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    monitor = getattr(tqdm, "monitor", None)
    if monitor is not None:
        monitor.exit()
        tqdm.monitor = None
    classes, found = [tqdm], []
    while classes:  # tqdm.auto's, huggingface_hub's ... each bar class keeps a lock of its own
        cls = classes.pop()
        found.append(cls)
        classes.extend(cls.__subclasses__())
    for cls in found:
        if "_lock" in cls.__dict__:
            delattr(cls, "_lock")
    from tqdm.std import TqdmDefaultWriteLock

    if "mp_lock" in TqdmDefaultWriteLock.__dict__:  # the semaphore itself is a class attribute
        del TqdmDefaultWriteLock.mp_lock
    gc.collect()  # the semaphore's mapping goes with its last reference
