"""The node's GPUs, by UUID, through NVML (``nvidia-ml-py``), or a mock set for GPU-less machines.

Instances name GPUs by UUID (stable across reboots and containers); vLLM wants
``CUDA_VISIBLE_DEVICES`` indices. This module translates one into the other.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from launcher.errors import BadRequest

log = logging.getLogger("launcher.gpus")


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML reports it."""

    index: int
    uuid: str
    name: str
    memory_mib: int | None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "uuid": self.uuid, "name": self.name, "memory_mib": self.memory_mib}


def mock_gpus(count: int) -> list[Gpu]:
    """``GPU-0`` ... ``GPU-<count-1>``: for tests and machines without GPUs."""
    return [Gpu(index, f"GPU-{index}", "Mock GPU", 81920) for index in range(count)]


def nvml_gpus() -> list[Gpu]:
    """The GPUs NVML sees; empty when there is no driver (a CPU machine)."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.info("no NVIDIA GPUs: %s", exc)
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20
            gpus.append(Gpu(index, _text(uuid), _text(name), int(memory)))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def visible_devices(uuids: Sequence[str], gpus: Sequence[Gpu]) -> str:
    """``CUDA_VISIBLE_DEVICES`` for ``uuids``, in the order given; 400 naming any unknown UUID."""
    by_uuid = {gpu.uuid: gpu for gpu in gpus}
    unknown = [uuid for uuid in uuids if uuid not in by_uuid]
    if unknown:
        known = ", ".join(by_uuid) or "none"
        raise BadRequest(f"unknown GPU UUID(s): {', '.join(unknown)} (this node has: {known})")
    duplicated = sorted({uuid for uuid in uuids if list(uuids).count(uuid) > 1})
    if duplicated:
        raise BadRequest(f"GPU UUID(s) listed more than once: {', '.join(duplicated)}")
    return ",".join(str(by_uuid[uuid].index) for uuid in uuids)
