"""The front door's view of memory: budgets, what each model holds or is expected to hold, and the
plans that make room (the policy itself is :mod:`launcher.frontdoor.room`, pure).

Read-only over the front door's models and the manager's instances: it decides nothing on its
own and changes nothing but a placed model's ``placed_gpus``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from launcher.frontdoor import room, sleep
from launcher.frontdoor.footprints import Expected, Footprints, model_path, weight_bytes
from launcher.frontdoor.lifecycle import Phase
from launcher.frontdoor.model_state import ModelState
from launcher.frontdoor.profiles import MODEL_ANNOTATION, ModelProfile
from launcher.instances.manager import InstanceManager
from launcher.instances.memory import Footprint, option_value, parse_size
from launcher.instances.state import InstanceRecord
from launcher.settings import Settings

HOLDING = (Phase.STARTING, Phase.READY, Phase.STOPPING, Phase.SLEEPING, Phase.WAKING)  # phases that hold room


class Fitting:
    """Budgets, expected footprints and room plans, for the front door."""

    def __init__(
        self, manager: InstanceManager, settings: Settings, footprints: Footprints, sleeps: Callable[[ModelState], bool]
    ) -> None:
        self._manager = manager
        self._settings = settings
        self._footprints = footprints
        self._sleeps = sleeps  # whether a model's instance sleeps when idle (the front door knows)

    def gpu_sizes(self) -> dict[str, int]:
        """Each GPU's size in bytes."""
        return {gpu.uuid: (gpu.memory_mib or 0) * 2**20 for gpu in self._manager.gpus}

    def budgets(self) -> room.Budgets:
        """The host budget (``--memory-budget``), each GPU's (its size less ``--gpu-memory-reserve``),
        and what instances the front door does not own hold (they count, and are never stopped)."""
        reserve = parse_size(self._settings.gpu_memory_reserve)
        gpu_budgets = {uuid: max(0, size - reserve) for uuid, size in self.gpu_sizes().items() if size}
        fixed_host, fixed_gpu = 0, dict.fromkeys(gpu_budgets, 0)
        for record in self._manager.all():
            if record.live and MODEL_ANNOTATION not in (record.config.annotations or {}) and record.memory is not None:
                fixed_host += record.memory.host_bytes
                for uuid, used in record.memory.gpu_bytes.items():
                    fixed_gpu[uuid] = fixed_gpu.get(uuid, 0) + used
        return room.Budgets(parse_size(self._settings.memory_budget), gpu_budgets, fixed_host, fixed_gpu)

    def expected(self, state: ModelState, profile: ModelProfile | None = None) -> Expected:
        """What the model is expected to hold, on the GPUs it names (or was placed on)."""
        profile = profile or state.profile
        gpus = profile.gpu_uuids if profile.gpu_uuids is not None else state.placed_gpus or []
        return self._footprints.expected(state.name, profile, self.gpu_sizes(), gpus)

    def fit_problem(self, state: ModelState) -> str | None:
        """Why the model can never start under the budgets (None: it can, given room)."""
        profile = state.profile
        budgets = self.budgets()
        if profile.gpu_uuids is None and self._manager.gpus:
            count, have = gpus_wanted(profile), len(self._manager.gpus)
            if count > have:
                return f"model {state.name!r} needs {count} GPUs (--tensor-parallel-size), the node has {have}"
            every = [gpu.uuid for gpu in self._manager.gpus]
            per_gpu = self._footprints.expected(state.name, profile, self.gpu_sizes(), every).footprint.gpu_bytes
            problems = [room.never_fits(room.Wanted(state.name, frozenset(), False, 0, {uuid: per_gpu[uuid]}), budgets)
                        for uuid in every]  # fmt: skip
            if all(problems):
                return problems[0]
        footprint = self.expected(state).footprint
        wanted = room.Wanted(state.name, frozenset(), False, footprint.host_bytes, footprint.gpu_bytes)
        return room.never_fits(wanted, budgets)

    def memory_use(self) -> dict[str, Any]:
        """Each budget and what every running instance holds against it (for the dashboard's bars)."""
        budgets = self.budgets()
        host_used, gpu_used = 0, dict.fromkeys(budgets.gpu_bytes, 0)
        for record in self._manager.all():
            if record.live and record.memory is not None:
                host_used += record.memory.host_bytes
                for uuid, used in record.memory.gpu_bytes.items():
                    gpu_used[uuid] = gpu_used.get(uuid, 0) + used
        return {
            "host": {"budget_bytes": budgets.host_bytes, "used_bytes": host_used},
            "gpus": {
                uuid: {"budget_bytes": budgets.gpu_bytes.get(uuid, 0), "used_bytes": used}
                for uuid, used in sorted(gpu_used.items())
            },  # fmt: skip
        }

    def remember_peaks(self, running: Iterable[tuple[ModelState, InstanceRecord]]) -> None:
        """Keep the measured peaks of the models' running instances (for their next estimates)."""
        for state, record in running:
            if state.running_profile is not None and record.memory_peak is not None:
                self._footprints.remember(state.name, state.running_profile, record.memory_peak)

    def holders(self, candidates: Iterable[tuple[ModelState, InstanceRecord | None, bool]]) -> list[room.Holder]:
        """The models holding room now, as the policy sees them: ``(state, its live record,
        whether its profile was removed)`` each; what it holds (measured, or expected), whether it
        may be stopped or put to sleep, and what it would hold asleep."""
        holders = []
        for state, record, removed in candidates:
            if state.phase not in HOLDING:
                continue  # a claim is only ever held while STARTING
            idle = state.in_flight == 0 and state.waiting == 0 and not removed and record is not None
            asleep = state.phase is Phase.SLEEPING
            evictable = idle and (state.phase is Phase.READY or (asleep and state.sleep_settled()))
            running = state.running_profile or state.profile
            expected = self.expected(state, running)
            host, gpu = expected.footprint.host_bytes, dict(expected.footprint.gpu_bytes)
            measured = None if record is None else record.memory_peak
            if measured is not None:  # what it holds, or what it declared if that is more
                host = max(host, measured.host_bytes) if expected.source == "declared" else measured.host_bytes
                gpu = {uuid: max(gpu.get(uuid, 0), used) for uuid, used in measured.gpu_bytes.items()} or gpu
            weights = weight_bytes(model_path(running.options))
            if asleep:  # what it held awake, less its GPU memory, plus (level 1) its weights on the host
                held = sleep.asleep(Footprint(host, gpu), weights, running.sleep_level)
                host, gpu = held.host_bytes, dict(held.gpu_bytes)
            sleepable = evictable and state.phase is Phase.READY and not state.retire and self._sleeps(state)
            once_asleep = sleep.asleep(Footprint(host, gpu), weights, running.sleep_level)
            gpus = running.gpu_uuids if running.gpu_uuids is not None else state.placed_gpus or []
            holders.append(
                room.Holder(
                    name=state.name,
                    gpu_uuids=frozenset(gpus),
                    share_gpu=running.share_gpu,
                    last_used=state.last_used or 0.0,
                    evictable=evictable,
                    host_bytes=host,
                    gpu_bytes=gpu,
                    sleepable=sleepable,
                    asleep=asleep,
                    asleep_host_bytes=once_asleep.host_bytes,
                    asleep_gpu_bytes=once_asleep.gpu_bytes,
                    key=state.uid,
                )
            )
        return holders

    def unowned_holders(self, owned: set[str]) -> list[room.Holder]:
        """The live front-door instances no model holds (``owned``: the instance ids models hold): a
        start cancelled while its instance is still stopping, a lost instance being removed, a
        compile-ahead throwaway. Each holds its GPUs (exclusively) and memory until it is gone;
        none may be stopped to make room (they are going, or give way by themselves)."""
        holders = []
        for record in self._manager.all():
            annotations = record.config.annotations or {}
            if not record.live or MODEL_ANNOTATION not in annotations or record.instance_id in owned:
                continue
            held = record.memory_peak or record.memory
            holders.append(room.Holder(
                name=f"{annotations[MODEL_ANNOTATION]} (instance {record.instance_id}, going)",
                gpu_uuids=frozenset(record.config.gpu_uuids or []),
                share_gpu=False,
                last_used=0.0,
                evictable=False,
                host_bytes=held.host_bytes if held is not None else 0,
                gpu_bytes=dict(held.gpu_bytes) if held is not None else {},
                key=("instance", record.instance_id),
            ))  # fmt: skip
        return holders

    def plan(
        self, state: ModelState, profile: ModelProfile, holders: list[room.Holder], live: int
    ) -> room.Actions | None:
        """What to put to sleep and what to stop so that ``profile`` can start now; a profile that
        names no GPUs on a node with GPUs is placed (``state.placed_gpus``) where that stops least."""
        budgets = self.budgets()
        if profile.gpu_uuids is None and self._manager.gpus:
            every = [gpu.uuid for gpu in self._manager.gpus]
            expected = self._footprints.expected(state.name, profile, self.gpu_sizes(), every).footprint
            wanted = room.Wanted(state.name, frozenset(), profile.share_gpu, expected.host_bytes, key=state.uid)
            placement = room.place(wanted, gpus_wanted(profile), every, expected.gpu_bytes, holders, live=live,
                                   max_instances=self._settings.max_instances, budgets=budgets)  # fmt: skip
            if placement is None:
                return None
            state.placed_gpus = list(placement.gpu_uuids)
            return placement.actions
        footprint = self.expected(state, profile).footprint
        wanted = room.Wanted(state.name, frozenset(profile.gpu_uuids or []), profile.share_gpu,
                             footprint.host_bytes, footprint.gpu_bytes, key=state.uid)  # fmt: skip
        return room.plan_actions(
            wanted, holders, live=live, max_instances=self._settings.max_instances, budgets=budgets
        )

    def plan_wake(
        self, state: ModelState, record: InstanceRecord, holders: list[room.Holder], live: int
    ) -> room.Actions | None:
        """What to do so that the sleeping ``record`` can take its GPU memory back (it is live
        already: ``live`` counts it, and the instance count does not grow)."""
        profile = state.running_profile or state.profile
        expected = self.expected(state, profile).footprint
        peak = record.memory_peak or expected
        wanted = room.Wanted(state.name, frozenset(record.config.gpu_uuids or []), profile.share_gpu,
                             max(expected.host_bytes, peak.host_bytes), {**expected.gpu_bytes, **peak.gpu_bytes},
                             key=state.uid)  # fmt: skip
        return room.plan_actions(wanted, holders, live=live - 1, max_instances=self._settings.max_instances,
                                 budgets=self.budgets())  # fmt: skip


def gpus_wanted(profile: ModelProfile) -> int:
    """How many GPUs the profile's instance uses: tensor parallel size times pipeline parallel size."""
    sizes = []
    for flags in (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp")):
        value = next((found for flag in flags if (found := option_value(profile.options, flag)) is not None), None)
        try:
            sizes.append(max(1, int(value)) if value is not None else 1)
        except ValueError:
            sizes.append(1)
    return sizes[0] * sizes[1]
