"""What the forkserver must leave behind before it forks instances that use an NVIDIA GPU.

Measured on an H100 (driver 580, torch 2.11; the probe is benchmarks/gpu/nvml_fork_probe.py,
its results in benchmarks/results/gpu_nvml_probe.json):

- ``torch.cuda.device_count()``, which vLLM calls while it is imported, initialises NVML
  through ctypes (``torch.cuda._raw_device_count_nvml``) and never shuts it down. NVML then
  holds descriptors on ``/dev/nvidiactl``, ``/dev/nvidia0``, ``/dev/nvidia-uvm`` and
  ``/dev/nvidia-caps/*``.
- A forked instance inherits NVML "initialised", but its fd sweep (child.py) closes those
  descriptors; the child's next ``nvmlInit`` only bumps the reference count and talks to the
  closed (or reused) descriptors: ``NVMLError_OperatingSystem: The operating system has
  blocked the request``. That is how every forked vLLM instance died in
  ``current_platform.has_device_capability``.
- Shutting NVML down completely in the forkserver (``nvmlShutdown`` until it answers
  "uninitialised") closes them; children then initialise NVML and CUDA from scratch and serve,
  with the sweep unchanged. Keeping the descriptors open in children works too, but would
  share one NVML state (and its kernel clients) between the forkserver and every instance.

NVML leaves one helper thread (``cuda00001800007``) after a full shutdown. Children forked
with it present initialise NVML and CUDA normally (probe cases O and Q): the thread owns no
state a fresh ``nvmlInit`` in the child reuses, so it is reported, not stopped.
"""

from __future__ import annotations

import ctypes
import os
import sys

NVML_LIBRARY = "libnvidia-ml.so.1"
NVML_SUCCESS = 0
_MAX_SHUTDOWNS = 1024  # NVML's reference count is small; this only bounds a misbehaving library
DEVICE_PREFIXES = ("/dev/nvidia",)


def release_nvml(library: str = NVML_LIBRARY) -> int:
    """Shut NVML down completely if this process loaded it; return how many shutdowns it took.

    Loads nothing: a process that never loaded ``library`` gets 0.
    """
    try:
        nvml = ctypes.CDLL(library, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return 0  # not loaded here (dlopen with RTLD_NOLOAD fails)
    shutdowns = 0
    while shutdowns < _MAX_SHUTDOWNS and nvml.nvmlShutdown() == NVML_SUCCESS:
        shutdowns += 1
    return shutdowns


def device_fds(prefixes: tuple[str, ...] = DEVICE_PREFIXES) -> dict[int, str]:
    """Open descriptors of this process that point at a GPU device node, by fd number."""
    found: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the fd that listed the directory, already closed
        if target.startswith(prefixes):
            found[int(name)] = target
    return dict(sorted(found.items()))


def thread_names() -> list[str]:
    """Names (``comm``) of this process's OS threads, the main thread first."""
    names: list[str] = []
    main = str(os.getpid())
    for tid in sorted(os.listdir("/proc/self/task"), key=lambda tid: (tid != main, int(tid))):
        try:
            with open(f"/proc/self/task/{tid}/comm", encoding="utf-8", errors="replace") as comm:
                names.append(comm.read().strip())
        except OSError:
            continue  # the thread ended while we looked
    return names


def extra_threads() -> list[str]:
    """Names of every OS thread but the main one: what a fork leaves behind."""
    return thread_names()[1:]


def cuda_initialized() -> bool:
    """True if torch is imported here and has initialised CUDA (children could not use it)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:  # noqa: BLE001 - a torch without CUDA support
        return False
