"""The front door's eviction policy (launcher/room.py), a pure function, checked with hypothesis.

Properties: it only ever evicts idle front-door holders; after its evictions the wanted model
fits (instance limit and GPUs); the extra evictions for the limit are the least recently used;
and it answers None only when no choice of evictions could make room (checked by brute force).
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.frontdoor.room import Holder, Wanted, plan_room

GPUS = ["GPU-0", "GPU-1", "GPU-2"]

gpu_sets = st.frozensets(st.sampled_from(GPUS), max_size=2)
holders_strategy = st.lists(
    st.builds(
        Holder,
        name=st.sampled_from([f"m{i}" for i in range(8)]),
        gpu_uuids=gpu_sets,
        share_gpu=st.booleans(),
        last_used=st.floats(min_value=0, max_value=1000, allow_nan=False),
        evictable=st.booleans(),
    ),
    max_size=6,
    unique_by=lambda holder: holder.name,
)
wanted_strategy = st.builds(Wanted, name=st.just("w"), gpu_uuids=gpu_sets, share_gpu=st.booleans())


def _fits(wanted: Wanted, remaining: list[Holder], live: int, max_instances: int) -> bool:
    for holder in remaining:
        if wanted.gpu_uuids & holder.gpu_uuids and not (wanted.share_gpu and holder.share_gpu):
            return False
    return not max_instances or live + 1 <= max_instances


@settings(max_examples=400, deadline=None)
@given(
    wanted=wanted_strategy,
    holders=holders_strategy,
    others=st.integers(min_value=0, max_value=4),
    max_instances=st.integers(min_value=0, max_value=8),
)
def test_plan_room_is_safe_sufficient_lru_and_complete(
    wanted: Wanted, holders: list[Holder], others: int, max_instances: int
) -> None:
    live = len(holders) + others  # `others`: instances created through /v2/vllm/instances
    plan = plan_room(wanted, holders, live=live, max_instances=max_instances)
    by_name = {holder.name: holder for holder in holders}
    if plan is not None:
        assert len(plan) == len(set(plan))
        assert all(by_name[name].evictable for name in plan), "a busy or non-front-door instance was evicted"
        remaining = [holder for holder in holders if holder.name not in plan]
        assert _fits(wanted, remaining, live - len(plan), max_instances)
        # Beyond the GPU conflicts, the victims are the least recently used idle holders.
        conflicts = {h.name for h in holders if wanted.gpu_uuids & h.gpu_uuids and not (wanted.share_gpu and h.share_gpu)}
        extra = [name for name in plan if name not in conflicts]
        spared = [h for h in holders if h.evictable and h.name not in plan]
        if extra and spared:
            assert max(by_name[name].last_used for name in extra) <= min(h.last_used for h in spared)
    else:
        # No subset of the evictable holders would have made room.
        evictable = [holder for holder in holders if holder.evictable]
        for size in range(len(evictable) + 1):
            for subset in itertools.combinations(evictable, size):
                names = {holder.name for holder in subset}
                remaining = [holder for holder in holders if holder.name not in names]
                assert not _fits(wanted, remaining, live - size, max_instances), f"room by evicting {names}"


def test_room_already_there_evicts_nothing() -> None:
    holder = Holder("a", frozenset({"GPU-0"}), False, 1.0, True)
    assert plan_room(Wanted("w", frozenset({"GPU-1"}), False), [holder], live=1, max_instances=4) == []


def test_gpu_sharing_needs_both_profiles_to_allow_it() -> None:
    wanted_shares = Wanted("w", frozenset({"GPU-0"}), True)
    holder_shares = Holder("a", frozenset({"GPU-0"}), True, 1.0, False)
    holder_exclusive = Holder("b", frozenset({"GPU-0"}), False, 1.0, False)
    assert plan_room(wanted_shares, [holder_shares], live=1, max_instances=0) == []
    assert plan_room(wanted_shares, [holder_exclusive], live=1, max_instances=0) is None  # busy: cannot evict


def test_least_recently_used_goes_first() -> None:
    old = Holder("old", frozenset(), False, 10.0, True)
    new = Holder("new", frozenset(), False, 20.0, True)
    assert plan_room(Wanted("w", frozenset(), False), [new, old], live=2, max_instances=2) == ["old"]
