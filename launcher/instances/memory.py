"""Memory sizes and what an instance holds: host PSS of its process tree, GPU memory per device.

Host memory is the PSS of every process of the instance (``/proc/<pid>/smaps_rollup``): pages
shared with the forkserver and with other instances are split between their users, so the
sum over instances is what the node really spends. GPU memory is what NVML reports for the
tree's processes per device; with mock GPUs, the instance's ``--gpu-memory-utilization`` share
of each mock device (what vLLM would take). Read from ``/proc`` directly: the API stays lean.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "ki": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "mi": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "gi": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40,
          "ti": 2**40}  # fmt: skip
DEFAULT_GPU_UTILIZATION = 0.9  # vLLM's --gpu-memory-utilization default


def parse_size(value: int | float | str) -> int:
    """Bytes from ``6442450944``, ``"6GiB"``, ``"512MiB"``, ``"1.5G"`` (SI for G, binary for GiB)."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string like '6GiB', not a boolean")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value}")
        return int(value)
    match = _SIZE.match(value)
    if match is None or match.group(2) is not None and match.group(2).lower() not in _UNITS:
        raise ValueError(
            f"{value!r} is not a size: give bytes, or a number with a unit (KiB, MiB, GiB, TiB, KB, MB, GB)"
        )
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def format_size(size: float) -> str:
    """``1.50 GiB``, ``540 MiB``: for messages."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}" if unit in ("TiB", "GiB") else f"{size / scale:.0f} {unit}"
    return f"{size:.0f} B"


@dataclass(frozen=True)
class Footprint:
    """Memory an instance holds (or is expected to hold): host bytes, and bytes per GPU UUID."""

    host_bytes: int = 0
    gpu_bytes: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"host_bytes": self.host_bytes, "gpu_bytes": dict(self.gpu_bytes)}

    def peak(self, other: Footprint) -> Footprint:
        """The larger of the two, per budget."""
        gpus = {uuid: max(self.gpu_bytes.get(uuid, 0), other.gpu_bytes.get(uuid, 0))
                for uuid in {*self.gpu_bytes, *other.gpu_bytes}}  # fmt: skip
        return Footprint(max(self.host_bytes, other.host_bytes), gpus)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (``/proc/<pid>/task/<tid>/children``)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as children:
                    queue.extend(int(child) for child in children.read().split())
            except OSError:
                continue
    return found


def pss_bytes(pids: Iterable[int]) -> int:
    """The PSS of these processes together (the ones gone by now count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                for line in rollup:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            continue
    return total


def gpu_utilization(options: str) -> float:
    """The ``--gpu-memory-utilization`` that instance options set (vLLM's default if none)."""
    value = option_value(options, "--gpu-memory-utilization")
    try:
        return DEFAULT_GPU_UTILIZATION if value is None else min(1.0, max(0.0, float(value)))
    except ValueError:
        return DEFAULT_GPU_UTILIZATION


def option_value(options: str, flag: str) -> str | None:
    """The value of ``flag`` in instance options (``--flag V`` or ``--flag=V``), if given."""
    try:
        tokens = shlex.split(options)
    except ValueError:
        return None
    for index, token in enumerate(tokens):
        if token == flag and index + 1 < len(tokens):
            return tokens[index + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def nvml_gpu_bytes(pids: Sequence[int]) -> dict[int, dict[str, int]]:
    """GPU memory NVML reports for each of ``pids``, by device UUID ({} without NVML): one NVML
    session for all of them (initialising NVML is not free)."""
    try:
        import pynvml
    except ImportError:
        return {}
    wanted: set[int] = set(pids)
    found: dict[int, dict[str, int]] = {}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = str(pynvml.nvmlDeviceGetUUID(handle))
            for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if process.pid in wanted and process.usedGpuMemory:
                    per_pid = found.setdefault(int(process.pid), {})
                    per_pid[uuid] = per_pid.get(uuid, 0) + int(process.usedGpuMemory)
    except pynvml.NVMLError:
        return found
    finally:
        pynvml.nvmlShutdown()
    return found
