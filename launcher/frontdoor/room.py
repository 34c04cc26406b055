"""Making room for a front-door start: which idle front-door instances to evict. A pure function.

Two limits: ``max_instances`` (every live instance counts, whoever created it) and GPUs (two
front-door instances naming the same GPU never run at once unless both profiles allow sharing:
vLLM takes most of a GPU's memory by default). Only idle front-door instances can be evicted,
least recently used first; instances created through ``/v2/vllm/instances`` never are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Holder:
    """A front-door model that holds (or is about to hold) an instance."""

    name: str
    gpu_uuids: frozenset[str]
    share_gpu: bool
    last_used: float
    evictable: bool  # ready with no request in flight (not starting, not stopping, not busy)


@dataclass(frozen=True)
class Wanted:
    """The model a request wants started."""

    name: str
    gpu_uuids: frozenset[str]
    share_gpu: bool


def _conflicts(wanted: Wanted, holder: Holder) -> bool:
    return bool(wanted.gpu_uuids & holder.gpu_uuids) and not (wanted.share_gpu and holder.share_gpu)


def plan_room(wanted: Wanted, holders: Sequence[Holder], *, live: int, max_instances: int) -> list[str] | None:
    """Names of the models to stop so that ``wanted`` can start now.

    ``live`` counts every live or reserved instance on the launcher (front-door or not);
    ``max_instances`` 0 means no limit. Returns ``[]`` when there is room already, and ``None``
    when no choice of idle front-door instances makes room (the caller waits and asks again).
    """
    chosen: list[Holder] = []
    for holder in holders:
        if holder.name != wanted.name and _conflicts(wanted, holder):
            if not holder.evictable:
                return None
            chosen.append(holder)
    if max_instances:
        spare = sorted(
            (holder for holder in holders if holder.evictable and holder not in chosen and holder.name != wanted.name),
            key=lambda holder: (holder.last_used, holder.name),
        )
        needed = live - len(chosen) + 1 - max_instances
        if needed > len(spare):
            return None
        chosen.extend(spare[: max(0, needed)])
    return [holder.name for holder in chosen]
