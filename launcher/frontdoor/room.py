"""Making room for a front-door start: which idle front-door instances to stop. Pure functions.

Four limits: ``max_instances`` (every live instance counts, whoever created it); GPUs (two
front-door instances naming the same GPU never run at once unless both profiles allow sharing:
vLLM takes most of a GPU's memory by default); the host memory budget; and each GPU's memory
budget. Instances created through ``/v2/vllm/instances`` count (``Budgets.fixed_*``) but are
never stopped; only idle front-door instances are, least recently used first, and no more of
them than needed. A model that may sleep (``idle: sleep``) is put to sleep before anything is
stopped: in order, idle awake models that may sleep are put to sleep, then sleeping ones are
stopped, then idle awake ones (least recently used first in each). :func:`place` also picks
the GPUs of a profile that names none.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from launcher.instances.memory import format_size

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
    sleepable: bool = False  # awake, idle, and may be put to sleep instead of stopped
    asleep: bool = False  # sleeping now (host_bytes and gpu_bytes are then what it holds asleep)
    asleep_host_bytes: int = 0  # what it would hold once asleep (for a sleepable holder)
    asleep_gpu_bytes: Mapping[str, int] = field(default_factory=dict)
    # Who it is (default: its name). The front door gives each model's state its own: a profile
    # deleted and added again is another model than its namesake still stopping, which holds room.
    key: Hashable = None

    @property
    def id(self) -> Hashable:
        """The holder's identity: its ``key``, or its name."""
        return self.name if self.key is None else self.key


@dataclass(frozen=True)
class Wanted:
    """The model a request wants started, and what it is expected to hold."""

    name: str
    gpu_uuids: frozenset[str]
    share_gpu: bool
    host_bytes: int = 0
    gpu_bytes: Mapping[str, int] = field(default_factory=dict)
    key: Hashable = None  # as Holder.key: a holder with the same identity is the wanted model itself

    @property
    def id(self) -> Hashable:
        """The wanted model's identity: its ``key``, or its name."""
        return self.name if self.key is None else self.key


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


@dataclass(frozen=True)
class Actions:
    """What to do to make room: models to put to sleep, and models to stop (by :attr:`Holder.id`)."""

    sleep: list[Hashable]
    stop: list[Hashable]


def _usage(holder: Holder, action: str) -> tuple[int, Mapping[str, int]]:
    if action == "sleep":
        return holder.asleep_host_bytes, holder.asleep_gpu_bytes
    return holder.host_bytes, holder.gpu_bytes


def _fits(wanted: Wanted, acts: Mapping[Hashable, str], holders: Sequence[Holder], *, live: int, max_instances: int,
          budgets: Budgets) -> bool:  # fmt: skip
    """Whether ``wanted`` can start once ``acts`` (holder id -> "sleep" or "stop") are done."""
    stopped = sum(1 for action in acts.values() if action == "stop")
    if max_instances and live - stopped + 1 > max_instances:
        return False
    kept = [(holder, acts.get(holder.id, "keep")) for holder in holders if acts.get(holder.id) != "stop"]
    if budgets.host_bytes:
        used = budgets.fixed_host + sum(_usage(holder, action)[0] for holder, action in kept)
        if used + wanted.host_bytes > budgets.host_bytes:
            return False
    for uuid, needed in wanted.gpu_bytes.items():
        limit = budgets.gpu_bytes.get(uuid)
        if limit:
            used = budgets.fixed_gpu.get(uuid, 0) + sum(
                _usage(holder, action)[1].get(uuid, 0) for holder, action in kept
            )
            if used + needed > limit:
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


def plan_actions(
    wanted: Wanted, holders: Sequence[Holder], *, live: int, max_instances: int, budgets: Budgets = NO_BUDGETS
) -> Actions | None:
    """What to put to sleep and what to stop so that ``wanted`` can start now.

    ``live`` counts every live or reserved instance on the launcher (front-door or not; a
    sleeping one too); ``max_instances`` 0 means no limit. ``Actions([], [])`` when there is
    room already, None when nothing idle can make room (the caller waits and asks again). In
    each step the least recently used go first, and no action is taken that is not needed.
    """
    others = [holder for holder in holders if holder.id != wanted.id]
    acts: dict[Hashable, str] = {}
    for holder in others:
        if _conflicts(wanted, holder):
            if not holder.evictable:
                return None
            acts[holder.id] = "stop"
    forced = set(acts)

    def fits(trial: Mapping[Hashable, str]) -> bool:
        return _fits(wanted, trial, others, live=live, max_instances=max_instances, budgets=budgets)

    def lru(chosen: Sequence[Holder]) -> list[Holder]:
        return sorted(chosen, key=lambda holder: (holder.last_used, holder.name))

    free = [holder for holder in others if holder.evictable and holder.id not in forced]
    steps: list[tuple[Holder, str]] = [(holder, "sleep") for holder in lru([h for h in free if h.sleepable])]
    steps += [(holder, "stop") for holder in lru([h for h in free if h.sleepable or h.asleep])]
    steps += [(holder, "stop") for holder in lru([h for h in free if not h.sleepable and not h.asleep])]
    taken: list[tuple[Holder, str]] = []
    for holder, action in steps:
        if fits(acts):
            break
        taken.append((holder, acts.get(holder.id, "keep")))  # what to go back to if it is not needed
        acts[holder.id] = action
    if not fits(acts):
        return None
    # Minimal: the last steps taken go back, one at a time, if the rest make room without them...
    for holder, before in reversed(taken):
        trial = {**acts}
        if before == "keep":
            trial.pop(holder.id)
        else:
            trial[holder.id] = before
        if fits(trial):
            acts = trial
    # ...until no action can be made weaker (a stop a sleep, a sleep nothing): one going back can
    # make another unneeded that was looked at before it.
    by_id = {holder.id: holder for holder in others}
    weakened = True
    while weakened:
        weakened = False
        for key in [key for key in acts if key not in forced]:
            softer = ["keep", "sleep"] if acts[key] == "stop" and by_id[key].sleepable else ["keep"]
            for action in softer:
                trial = {**acts, key: action}
                if action == "keep":
                    trial.pop(key)
                if fits(trial):
                    acts, weakened = trial, True
                    break
            if weakened:
                break
    return Actions(sleep=[key for key, action in acts.items() if action == "sleep"],
                   stop=[key for key, action in acts.items() if action == "stop"])  # fmt: skip


def plan_room(
    wanted: Wanted, holders: Sequence[Holder], *, live: int, max_instances: int, budgets: Budgets = NO_BUDGETS
) -> list[Hashable] | None:
    """Names of the models to stop so that ``wanted`` can start now (no model may sleep here).

    None when no choice of idle front-door instances makes room. Those stopped are the least
    recently used that help, and none is stopped that is not needed.
    """
    awake = [replace(holder, sleepable=False) for holder in holders]
    actions = plan_actions(wanted, awake, live=live, max_instances=max_instances, budgets=budgets)
    return None if actions is None else actions.stop


@dataclass(frozen=True)
class Placement:
    """The GPUs chosen for a profile that names none, and who is stopped to make room there."""

    gpu_uuids: tuple[str, ...]
    actions: Actions

    @property
    def victims(self) -> list[Hashable]:
        """The models stopped for it."""
        return self.actions.stop


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
    best: tuple[tuple[int, int, float], Placement] | None = None
    last_used = {holder.id: holder.last_used for holder in holders}
    for gpu_set in itertools.islice(itertools.combinations(gpus, count), MAX_PLACEMENTS):
        trial = Wanted(wanted.name, frozenset(gpu_set), wanted.share_gpu, wanted.host_bytes,
                       {uuid: per_gpu_bytes.get(uuid, 0) for uuid in gpu_set}, wanted.key)  # fmt: skip
        actions = plan_actions(trial, holders, live=live, max_instances=max_instances, budgets=budgets)
        if actions is None:
            continue
        cost = (len(actions.stop), len(actions.sleep),
                max((last_used.get(name, 0.0) for name in actions.stop + actions.sleep), default=0.0))  # fmt: skip
        if best is None or cost < best[0]:
            best = (cost, Placement(gpu_set, actions))
    return None if best is None else best[1]
