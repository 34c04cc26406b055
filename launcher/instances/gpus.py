"""The node's GPUs, by UUID, through NVML (``nvidia-ml-py``), or a mock set for GPU-less machines.

Instances name GPUs by UUID (stable across reboots and containers); vLLM wants
``CUDA_VISIBLE_DEVICES`` indices. This module translates one into the other.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import BadRequest

log = logging.getLogger("launcher.instances.gpus")


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


class GpuMapError(ValueError):
    """A GPU map that cannot be read; the message names the file and the problem."""


def _node_entry(path: Path, node: str) -> Any:
    """The node's entry of a GPU map: a directory (a mounted ConfigMap: one file per node) or a
    file holding the ConfigMap's ``data`` (or the whole ConfigMap)."""
    if path.is_dir():
        entry = path / node
        return entry.read_text() if entry.is_file() else None
    document = yaml.safe_load(path.read_text())
    if isinstance(document, dict) and isinstance(document.get("data"), dict):
        document = document["data"]  # a whole ConfigMap manifest
    if not isinstance(document, dict):
        raise GpuMapError(f"GPU map {path}: expected a mapping of node names to GPU maps")
    return document.get(node)


def mapped_gpus(path: str, node: str) -> list[Gpu] | None:
    """Mock GPUs of ``node`` from a GPU map like FMA's ``gpu-map`` ConfigMap; None if it lacks the node.

    Each node's value maps GPU UUIDs to indices, as JSON text (what a ConfigMap holds) or as a
    mapping: ``{"GPU-0a1b": 0, "GPU-2c3d": 1}``.
    """
    try:
        entry = _node_entry(Path(path), node)
        if entry is None:
            return None
        mapping = json.loads(entry) if isinstance(entry, str) else entry
    except (OSError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise GpuMapError(f"GPU map {path}: {exc}") from None
    if not isinstance(mapping, dict) or not all(
        isinstance(uuid, str) and isinstance(index, int) and not isinstance(index, bool) and index >= 0
        for uuid, index in mapping.items()
    ):
        raise GpuMapError(f'GPU map {path}, node {node!r}: expected {{"GPU-UUID": index, ...}}, got {entry!r:.200}')
    if len(set(mapping.values())) != len(mapping):
        raise GpuMapError(f"GPU map {path}, node {node!r}: two UUIDs share an index")
    return [Gpu(index, uuid, "Mock GPU", 81920) for uuid, index in sorted(mapping.items(), key=lambda item: item[1])]


def configured_gpus(*, mock: bool, count: int, gpu_map: str, node_name: str) -> list[Gpu]:
    """The GPUs the launcher offers: NVML's, or with ``mock`` the node's entry of ``gpu_map``
    (selected by ``node_name``, default ``$NODE_NAME``), or ``GPU-0`` ... ``GPU-<count-1>``."""
    if not mock:
        return nvml_gpus()
    node = node_name or os.environ.get("NODE_NAME", "")
    if gpu_map:
        if not node:
            log.warning("a GPU map is set but no node name (--node-name or NODE_NAME): using GPU-0..%d", count - 1)
        else:
            found = mapped_gpus(gpu_map, node)
            if found is not None:
                log.info("mock GPUs of node %s from %s: %s", node, gpu_map, [gpu.uuid for gpu in found])
                return found
            log.warning("node %s is not in the GPU map %s: using GPU-0..%d", node, gpu_map, count - 1)
    return mock_gpus(count)


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
