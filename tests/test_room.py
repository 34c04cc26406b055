"""The front door's eviction policy (launcher/frontdoor/room.py), pure functions, checked with hypothesis.

Properties: it only ever evicts idle front-door holders; after its evictions the wanted model
fits (instance limit and GPUs); the extra evictions for the limit are the least recently used;
and it answers None only when no choice of evictions could make room (checked by brute force).
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.frontdoor.room import Budgets, Holder, Wanted, never_fits, place, plan_actions, plan_room

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


# ---------------------------------------------------------------------- memory budgets and placement

GIB = 2**30
memory_holders = st.lists(
    st.builds(
        Holder,
        name=st.sampled_from([f"m{i}" for i in range(7)]),
        gpu_uuids=gpu_sets,
        share_gpu=st.booleans(),
        last_used=st.floats(min_value=0, max_value=1000, allow_nan=False),
        evictable=st.booleans(),
        host_bytes=st.integers(min_value=0, max_value=8).map(lambda n: n * GIB),
        gpu_bytes=st.dictionaries(st.sampled_from(GPUS), st.integers(min_value=0, max_value=80).map(lambda n: n * GIB)),
    ),
    max_size=6,
    unique_by=lambda holder: holder.name,
)
budgets_strategy = st.builds(
    Budgets,
    host_bytes=st.sampled_from([0, 4 * GIB, 10 * GIB, 16 * GIB]),
    gpu_bytes=st.dictionaries(st.sampled_from(GPUS), st.sampled_from([40 * GIB, 79 * GIB])),
    fixed_host=st.sampled_from([0, 2 * GIB]),
    fixed_gpu=st.dictionaries(st.sampled_from(GPUS), st.sampled_from([0, 10 * GIB])),
)
memory_wanted = st.builds(
    Wanted, name=st.just("w"), gpu_uuids=gpu_sets, share_gpu=st.booleans(),
    host_bytes=st.integers(min_value=0, max_value=6).map(lambda n: n * GIB),
    gpu_bytes=st.dictionaries(st.sampled_from(GPUS), st.integers(min_value=0, max_value=80).map(lambda n: n * GIB)),
)  # fmt: skip


def _fits_all(wanted: Wanted, remaining: list[Holder], live: int, max_instances: int, budgets: Budgets) -> bool:
    if not _fits(wanted, remaining, live, max_instances):
        return False
    if budgets.host_bytes and budgets.fixed_host + sum(h.host_bytes for h in remaining) + wanted.host_bytes > budgets.host_bytes:
        return False
    for uuid, needed in wanted.gpu_bytes.items():
        limit = budgets.gpu_bytes.get(uuid)
        if limit and budgets.fixed_gpu.get(uuid, 0) + sum(h.gpu_bytes.get(uuid, 0) for h in remaining) + needed > limit:
            return False
    return True


@settings(max_examples=400, deadline=None)
@given(wanted=memory_wanted, holders=memory_holders, others=st.integers(min_value=0, max_value=3),
       max_instances=st.integers(min_value=0, max_value=8), budgets=budgets_strategy)  # fmt: skip
def test_plan_room_by_memory_is_safe_sufficient_and_minimal(
    wanted: Wanted, holders: list[Holder], others: int, max_instances: int, budgets: Budgets
) -> None:
    live = len(holders) + others
    plan = plan_room(wanted, holders, live=live, max_instances=max_instances, budgets=budgets)
    by_name = {holder.name: holder for holder in holders}
    conflicts = {h.name for h in holders if wanted.gpu_uuids & h.gpu_uuids and not (wanted.share_gpu and h.share_gpu)}
    if plan is not None:
        assert all(by_name[name].evictable for name in plan), "a busy or non-front-door instance was stopped"
        remaining = [holder for holder in holders if holder.name not in plan]
        assert _fits_all(wanted, remaining, live - len(plan), max_instances, budgets)  # safe
        for name in set(plan) - conflicts:  # minimal: every other victim is needed
            kept = [*remaining, by_name[name]]
            assert not _fits_all(wanted, kept, live - len(plan) + 1, max_instances, budgets), f"{name} was not needed"
    else:  # sufficient: no choice of idle front-door instances would have made room
        evictable = [holder for holder in holders if holder.evictable]
        for size in range(len(evictable) + 1):
            for subset in itertools.combinations(evictable, size):
                names = {holder.name for holder in subset}
                remaining = [holder for holder in holders if holder.name not in names]
                assert not _fits_all(wanted, remaining, live - size, max_instances, budgets), f"room by {names}"


@settings(max_examples=200, deadline=None)
@given(holders=holders_strategy, size=st.integers(min_value=1, max_value=4), budget=st.integers(min_value=1, max_value=8))
def test_with_models_of_one_size_the_least_recently_used_make_room(holders: list[Holder], size: int, budget: int) -> None:
    sized = [Holder(h.name, frozenset(), False, h.last_used, h.evictable, size * GIB) for h in holders]
    wanted = Wanted("w", frozenset(), False, size * GIB)
    plan = plan_room(wanted, sized, live=len(sized), max_instances=0, budgets=Budgets(host_bytes=budget * GIB))
    if plan:
        spared = [h for h in sized if h.evictable and h.name not in plan]
        if spared:
            assert max(h.last_used for h in sized if h.name in plan) <= min(h.last_used for h in spared)


def test_a_model_larger_than_a_budget_never_fits() -> None:
    budgets = Budgets(host_bytes=4 * GIB, gpu_bytes={"GPU-0": 79 * GIB})
    assert never_fits(Wanted("w", frozenset(), False, 3 * GIB), budgets) is None
    assert "more than the whole budget (--memory-budget 4.00 GiB)" in (
        never_fits(Wanted("w", frozenset(), False, 5 * GIB), budgets) or "")
    assert "on GPU GPU-0" in (never_fits(Wanted("w", frozenset(), False, 0, {"GPU-0": 80 * GIB}), budgets) or "")


@settings(max_examples=200, deadline=None)
@given(holders=memory_holders, count=st.integers(min_value=1, max_value=2),
       per_gpu=st.sampled_from([30 * GIB, 72 * GIB]), budgets=budgets_strategy)  # fmt: skip
def test_placement_picks_the_gpus_needing_the_fewest_stops(
    holders: list[Holder], count: int, per_gpu: int, budgets: Budgets
) -> None:
    budgets = Budgets(budgets.host_bytes, dict.fromkeys(GPUS, 79 * GIB), budgets.fixed_host, budgets.fixed_gpu)
    wanted = Wanted("w", frozenset(), False, GIB)
    found = place(wanted, count, GPUS, dict.fromkeys(GPUS, per_gpu), holders, live=len(holders),
                  max_instances=0, budgets=budgets)  # fmt: skip
    plans = {}
    for gpu_set in itertools.combinations(GPUS, count):
        trial = Wanted("w", frozenset(gpu_set), False, GIB, dict.fromkeys(gpu_set, per_gpu))
        plans[gpu_set] = plan_room(trial, holders, live=len(holders), max_instances=0, budgets=budgets)
    possible = {gpu_set: plan for gpu_set, plan in plans.items() if plan is not None}
    if found is None:
        assert not possible
    else:
        assert len(found.gpu_uuids) == count and found.victims == plans[found.gpu_uuids]
        assert len(found.victims) == min(len(plan) for plan in possible.values())


# ---------------------------------------------------------------------- sleeping models (idle: sleep)

sleeping_holders = st.lists(
    st.builds(
        Holder,
        name=st.sampled_from([f"m{i}" for i in range(6)]),
        gpu_uuids=st.just(frozenset()),
        share_gpu=st.just(True),
        last_used=st.floats(min_value=0, max_value=1000, allow_nan=False),
        evictable=st.booleans(),
        host_bytes=st.integers(min_value=0, max_value=4).map(lambda n: n * GIB),
        gpu_bytes=st.fixed_dictionaries({"GPU-0": st.integers(min_value=0, max_value=70).map(lambda n: n * GIB)}),
        sleepable=st.booleans(),
        asleep=st.booleans(),
        asleep_host_bytes=st.integers(min_value=0, max_value=8).map(lambda n: n * GIB),
        asleep_gpu_bytes=st.just({"GPU-0": GIB}),
    ).filter(lambda holder: not (holder.sleepable and holder.asleep)),
    max_size=5,
    unique_by=lambda holder: holder.name,
)


def _fits_acts(wanted: Wanted, holders: list[Holder], acts: dict[str, str], live: int, max_instances: int,
               budgets: Budgets) -> bool:  # fmt: skip
    remaining = []
    for holder in holders:
        action = acts.get(holder.name, "keep")
        if action == "stop":
            continue
        if action == "sleep":
            holder = Holder(holder.name, holder.gpu_uuids, holder.share_gpu, holder.last_used, holder.evictable,
                            holder.asleep_host_bytes, holder.asleep_gpu_bytes)  # fmt: skip
        remaining.append(holder)
    stopped = sum(1 for action in acts.values() if action == "stop")
    return _fits_all(wanted, remaining, live - stopped, max_instances, budgets)


@settings(max_examples=400, deadline=None)
@given(holders=sleeping_holders, max_instances=st.integers(min_value=0, max_value=6),
       host=st.sampled_from([0, 6 * GIB, 12 * GIB]), need=st.integers(min_value=1, max_value=70))  # fmt: skip
def test_sleep_comes_before_stop_and_nothing_is_done_that_is_not_needed(
    holders: list[Holder], max_instances: int, host: int, need: int
) -> None:
    wanted = Wanted("w", frozenset({"GPU-0"}), True, GIB, {"GPU-0": need * GIB})
    budgets = Budgets(host_bytes=host, gpu_bytes={"GPU-0": 79 * GIB})
    live = len(holders)
    actions = plan_actions(wanted, holders, live=live, max_instances=max_instances, budgets=budgets)
    by_name = {holder.name: holder for holder in holders}
    choices = {h.name: (["keep", "sleep", "stop"] if h.sleepable else ["keep", "stop"]) for h in holders if h.evictable}
    if actions is None:  # sufficient: no assignment of actions to idle models makes room
        for assignment in itertools.product(*choices.values()):
            acts = {name: action for name, action in zip(choices, assignment, strict=True) if action != "keep"}
            assert not _fits_acts(wanted, holders, acts, live, max_instances, budgets), f"room by {acts}"
        return
    acts = {**dict.fromkeys(actions.sleep, "sleep"), **dict.fromkeys(actions.stop, "stop")}
    assert all(by_name[name].evictable for name in acts) and all(by_name[name].sleepable for name in actions.sleep)
    assert _fits_acts(wanted, holders, acts, live, max_instances, budgets)  # safe
    for name, action in acts.items():  # minimal: every action, made weaker, no longer makes room
        weaker = ["keep", "sleep"] if action == "stop" and by_name[name].sleepable else ["keep"]
        for softer in weaker:
            trial = {**acts, name: softer}
            trial = {key: value for key, value in trial.items() if value != "keep"}
            assert not _fits_acts(wanted, holders, trial, live, max_instances, budgets), f"{name}: {softer} would do"
