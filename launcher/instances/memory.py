"""Memory sizes and what an instance holds: host PSS of its process tree, GPU memory per device.

Host memory is the PSS of every process of the instance (``/proc/<pid>/smaps_rollup``): pages
shared with the forkserver and with other instances are split between their users, so the
sum over instances is what the node really spends. GPU memory is what NVML reports for the
tree's processes per device; with mock GPUs, the instance's ``--gpu-memory-utilization`` share
of each mock device (what vLLM would take). Read from ``/proc`` directly: the API stays lean.

Reading ``smaps_rollup`` walks a process's page tables: about 10 ms for each process of a tiny
vLLM instance, more for a bigger one. So :class:`SampleSchedule` reads it only when it may have
moved: every look while the instance starts (its peak counts), at once after a cheap sign of a
change, and otherwise less and less often while the value stays put.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "ki": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "mi": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "gi": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40,
          "ti": 2**40}  # fmt: skip
DEFAULT_GPU_UTILIZATION = 0.9  # vLLM's --gpu-memory-utilization default
FAST_SAMPLE_SECONDS = 2.0  # how often a starting or changing instance's memory is read
SLOW_SAMPLE_SECONDS = 120.0  # the longest an instance whose memory stays put goes unread
STEADY_SHARE = 0.02  # PSS within this share of the last sample: unchanged (it wobbles by ~1 % at rest)
RSS_CHANGE_BYTES = 4 * 2**20  # the tree's RSS moved this much: read its PSS now
# The tree worked this much CPU since its last sample: pages it shared may have been copied (PSS
# grows, RSS does not). An idle vLLM uses about 1 % of a core: this is a sample every ~100 s.
CPU_CHANGE_SECONDS = 1.0
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


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


def rss_and_cpu(pids: Iterable[int]) -> tuple[int, float, int]:
    """RSS bytes and CPU seconds of these processes together, and how many are alive: from
    ``/proc/<pid>/stat`` (counters the kernel keeps: cheap, unlike ``smaps_rollup``)."""
    rss, cpu, alive = 0, 0.0, 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # After "(comm)": utime and stime are the 12th and 13th, rss (pages) the 22nd (proc(5)).
        rss += int(fields[21]) * _PAGE
        cpu += (int(fields[11]) + int(fields[12])) / _TICKS
        alive += 1
    return rss, cpu, alive


@dataclass
class _Sampled:
    pids: list[int]  # the process tree then
    rss: int
    cpu: float
    footprint: Footprint
    interval: float
    next_at: float
    generation: int


class SampleSchedule:
    """When to read each instance's PSS (the costly part of a sample).

    Now if: it starts (its peak counts), it was never read, something moved every instance's
    share (:meth:`changed`), a process of its tree ended, its RSS moved, it worked a second of
    CPU, or its interval is up. The interval doubles from ``FAST_SAMPLE_SECONDS`` up to
    ``SLOW_SAMPLE_SECONDS`` while its PSS stays put, and starts again at any change. The cheap
    signs come from ``/proc/<pid>/stat`` of the tree as last read (a process it starts later is
    seen at its next sample).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sampled: dict[str, _Sampled] = {}
        self._generation = 0
        # The generation each due instance was asked at: a change while it is read is not lost.
        self._asked: dict[str, int] = {}

    def changed(self) -> None:
        """Every instance's PSS may have moved: an instance started, became ready or stopped (pages
        shared with the forkserver are split anew), or one went to sleep or woke."""
        self._generation += 1

    def due(self, key: str, *, starting: bool) -> bool:
        """Whether ``key``'s memory must be read now."""
        self._asked[key] = self._generation
        last = self._sampled.get(key)
        if last is None or starting or last.generation != self._generation or self._clock() >= last.next_at:
            return True
        rss, cpu, alive = rss_and_cpu(last.pids)
        return alive < len(last.pids) or abs(rss - last.rss) >= RSS_CHANGE_BYTES or cpu - last.cpu >= CPU_CHANGE_SECONDS

    def sampled(self, key: str, pids: list[int], footprint: Footprint) -> None:
        """``key``'s tree ``pids`` was just read: it holds ``footprint``."""
        last = self._sampled.get(key)
        generation = self._asked.pop(key, self._generation)
        interval = FAST_SAMPLE_SECONDS  # new, changed, or just after a change: follow it closely
        if last is not None and last.generation == generation and _steady(last.footprint, footprint):
            interval = min(SLOW_SAMPLE_SECONDS, 2 * last.interval)
        rss, cpu, _ = rss_and_cpu(pids)
        now = self._clock()
        self._sampled[key] = _Sampled(pids, rss, cpu, footprint, interval, now + interval, generation)

    def keep_only(self, keys: Iterable[str]) -> None:
        """Forget the instances not in ``keys`` (gone)."""
        wanted = set(keys)
        for key in [key for key in self._sampled if key not in wanted]:
            del self._sampled[key]
        self._asked = {key: generation for key, generation in self._asked.items() if key in wanted}


def _steady(before: Footprint, now: Footprint) -> bool:
    """Whether every size moved less than ``STEADY_SHARE``."""
    pairs = [(before.host_bytes, now.host_bytes)]
    pairs += [(before.gpu_bytes.get(uuid, 0), now.gpu_bytes.get(uuid, 0)) for uuid in {*before.gpu_bytes, *now.gpu_bytes}]
    return all(abs(new - old) <= STEADY_SHARE * max(old, 1) for old, new in pairs)


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
