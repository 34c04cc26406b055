"""Making room for a front-door start: which idle front-door instances to stop. Pure functions.

Four limits: ``max_instances`` (every live instance counts, whoever created it); GPUs (two
front-door instances naming the same GPU never run at once unless both profiles allow sharing:
vLLM takes most of a GPU's memory by default); the host memory budget; and each GPU's memory
budget. Instances created through ``/v2/vllm/instances`` count (``Budgets.fixed_*``) but are
never stopped; only idle front-door instances are, least recently used first, and no more of
them than needed. :func:`place` also picks the GPUs of a profile that names none.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from launcher.memory import format_size

MAX_PLACEMENTS = 512  # GPU sets tried for one placement (8 GPUs choose 4 is 70)


@dataclass(frozen=True)
class Holder:
    """A front-door model that holds (or is about to hold) an instance."""

    name: str
    gpu_uuids: frozenset[str]
    share_gpu: bool
    last_used: float
    evictable: bool  # ready with no request in flight (not starting, not stopping, not busy)
    host_bytes: int = 0  # what it holds (measured), or is expected to hold (starting)
    gpu_bytes: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Wanted:
    """The model a request wants started, and what it is expected to hold."""

    name: str
    gpu_uuids: frozenset[str]
    share_gpu: bool
    host_bytes: int = 0
    gpu_bytes: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Budgets:
    """Memory limits (0 or absent: none) and what instances the front door never stops hold."""

    host_bytes: int = 0
    gpu_bytes: Mapping[str, int] = field(default_factory=dict)  # per GPU UUID
    fixed_host: int = 0
    fixed_gpu: Mapping[str, int] = field(default_factory=dict)


NO_BUDGETS = Budgets()


def _conflicts(wanted: Wanted, holder: Holder) -> bool:
    return bool(wanted.gpu_uuids & holder.gpu_uuids) and not (wanted.share_gpu and holder.share_gpu)


def _fits(wanted: Wanted, kept: Sequence[Holder], *, live: int, stopped: int, max_instances: int,
          budgets: Budgets) -> bool:  # fmt: skip
    """Whether ``wanted`` can start beside ``kept`` (``stopped`` of the live instances stopped)."""
    if max_instances and live - stopped + 1 > max_instances:
        return False
    if (
        budgets.host_bytes
        and budgets.fixed_host + sum(h.host_bytes for h in kept) + wanted.host_bytes > budgets.host_bytes
    ):
        return False
    for uuid, needed in wanted.gpu_bytes.items():
        limit = budgets.gpu_bytes.get(uuid)
        if limit and budgets.fixed_gpu.get(uuid, 0) + sum(h.gpu_bytes.get(uuid, 0) for h in kept) + needed > limit:
            return False
    return True


def never_fits(wanted: Wanted, budgets: Budgets) -> str | None:
    """Why ``wanted`` exceeds a budget even on an empty node (None if it does not)."""
    if budgets.host_bytes and wanted.host_bytes > budgets.host_bytes:
        return (f"model {wanted.name!r} needs about {format_size(wanted.host_bytes)} of host memory, "
                f"more than the whole budget (--memory-budget {format_size(budgets.host_bytes)})")  # fmt: skip
    for uuid, needed in sorted(wanted.gpu_bytes.items()):
        limit = budgets.gpu_bytes.get(uuid)
        if limit and needed > limit:
            return (f"model {wanted.name!r} needs about {format_size(needed)} on GPU {uuid}, more than its "
                    f"budget ({format_size(limit)}: the device less --gpu-memory-reserve)")  # fmt: skip
    return None


def plan_room(
    wanted: Wanted, holders: Sequence[Holder], *, live: int, max_instances: int, budgets: Budgets = NO_BUDGETS
) -> list[str] | None:
    """Names of the models to stop so that ``wanted`` can start now.

    ``live`` counts every live or reserved instance on the launcher (front-door or not);
    ``max_instances`` 0 means no limit. Returns ``[]`` when there is room already, and ``None``
    when no choice of idle front-door instances makes room (the caller waits and asks again).
    Those stopped are the least recently used that help, and none is stopped that is not needed.
    """
    others = [holder for holder in holders if holder.name != wanted.name]
    chosen: list[Holder] = []
    for holder in others:
        if _conflicts(wanted, holder):
            if not holder.evictable:
                return None
            chosen.append(holder)
    forced = len(chosen)

    def fits(stopping: Sequence[Holder]) -> bool:
        kept = [holder for holder in others if holder not in stopping]
        return _fits(wanted, kept, live=live, stopped=len(stopping), max_instances=max_instances, budgets=budgets)

    spare = sorted((h for h in others if h.evictable and h not in chosen), key=lambda h: (h.last_used, h.name))
    for holder in spare:
        if fits(chosen):
            break
        chosen.append(holder)
    if not fits(chosen):
        return None
    # Minimal: the most recently used of those picked goes back if the rest make room without it.
    for holder in reversed(chosen[forced:]):
        fewer = [other for other in chosen if other is not holder]
        if fits(fewer):
            chosen = fewer
    return [holder.name for holder in chosen]


@dataclass(frozen=True)
class Placement:
    """The GPUs chosen for a profile that names none, and who is stopped to make room there."""

    gpu_uuids: tuple[str, ...]
    victims: list[str]


def place(
    wanted: Wanted,
    count: int,
    gpus: Sequence[str],
    per_gpu_bytes: Mapping[str, int],
    holders: Sequence[Holder],
    *,
    live: int,
    max_instances: int,
    budgets: Budgets = NO_BUDGETS,
) -> Placement | None:
    """Where ``wanted`` (``count`` GPUs, ``per_gpu_bytes`` on each) fits with the least stopped.

    Ties go to the placement whose victims were used least recently, then to the GPUs in order.
    None if no set of ``count`` GPUs can be made room on.
    """
    best: tuple[tuple[int, float], Placement] | None = None
    last_used = {holder.name: holder.last_used for holder in holders}
    for gpu_set in itertools.islice(itertools.combinations(gpus, count), MAX_PLACEMENTS):
        trial = Wanted(wanted.name, frozenset(gpu_set), wanted.share_gpu, wanted.host_bytes,
                       {uuid: per_gpu_bytes.get(uuid, 0) for uuid in gpu_set})  # fmt: skip
        victims = plan_room(trial, holders, live=live, max_instances=max_instances, budgets=budgets)
        if victims is None:
            continue
        cost = (len(victims), max((last_used.get(name, 0.0) for name in victims), default=0.0))
        if best is None or cost < best[0]:
            best = (cost, Placement(gpu_set, victims))
    return None if best is None else best[1]
