"""Room by memory on a real launcher (stand-in workload, mock GPUs): budgets, estimates, placement.

The stand-ins' declared ``memory`` stands in for what real models hold (a stand-in itself is
about 25 MiB); mock GPUs are 80 GiB each and an instance takes its ``--gpu-memory-utilization``
share of each, as vLLM does. The real vLLM's footprints are measured in test_front_door_vllm.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.launcher_process import free_port, wait_until
from tests.test_front_door_standin import ask, front_door, metric, model_state

GIB = 2**30


def test_a_host_budget_stops_the_least_recently_used_and_refuses_what_never_fits(tmp_path: Path) -> None:
    models = """\
models:
  a: {options: "--model A", memory: 100MiB}
  b: {options: "--model B", memory: 100MiB}
  c: {options: "--model C", memory: 100MiB}
  big: {options: "--model BIG", memory: 1GiB}
"""
    with front_door(tmp_path, models, LAUNCHER_MEMORY_BUDGET="250MiB", LAUNCHER_MAX_INSTANCES="10") as launcher:
        assert ask(launcher, "a").status_code == 200
        assert ask(launcher, "b").status_code == 200
        assert [model_state(launcher, m)["state"] for m in "ab"] == ["ready", "ready"]  # two fit in 250 MiB
        assert ask(launcher, "c").status_code == 200
        assert [model_state(launcher, m)["state"] for m in "abc"] == ["stopped", "ready", "ready"]  # a: the oldest
        assert metric(launcher, "launcher_front_door_evictions_total", model="a") == 1

        refused = ask(launcher, "big")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "insufficient_memory"
        assert "needs about 1.00 GiB of host memory, more than the whole budget" in refused.json()["error"]["message"]
        assert "retry-after" not in refused.headers  # it will not fit later either
        assert [model_state(launcher, m)["state"] for m in "bc"] == ["ready", "ready"]  # nothing was stopped for it
        big = model_state(launcher, "big")
        assert big["fits"] is False and "more than the whole budget" in big["fit_problem"]
        assert big["memory_estimate"] == {"host_bytes": GIB, "gpu_bytes": {}, "source": "declared"}

        put = launcher.client.put("/v2/vllm/models/huge", json={"options": "--model H", "memory": "2GiB"})
        assert put.status_code == 201 and put.json()["fits"] is False  # the PUT's answer says so
        bad = launcher.client.put("/v2/vllm/models/odd", json={"options": "--model O", "memory": "lots"})
        assert bad.status_code == 422 and "'lots' is not a size" in bad.json()["detail"]


def test_instances_report_what_they_hold_and_estimates_learn_from_them(tmp_path: Path) -> None:
    footprints = tmp_path / "footprints.json"
    models = 'models:\n  m: {options: "--model M", idle_timeout: 0}\n'
    with front_door(tmp_path, models, LAUNCHER_FOOTPRINTS_FILE=str(footprints)) as launcher:
        assert model_state(launcher, "m")["memory_estimate"]["source"] == "estimated"
        assert ask(launcher, "m").status_code == 200
        instance_id = model_state(launcher, "m")["instance_id"]
        state = wait_until(lambda: (s := launcher.state(instance_id)).get("memory") and s, 20, what="a memory sample")
        assert 5 * 2**20 < state["memory"]["host_bytes"] < 2 * GIB and state["memory"]["gpu_bytes"] == {}
        assert metric(launcher, "launcher_instance_host_memory_bytes", instance_id=instance_id) > 0
        wait_until(footprints.exists, 20, what="the measured peak to be kept")
        assert model_state(launcher, "m")["memory_estimate"]["source"] == "measured"
    kept = json.loads(footprints.read_text())
    assert [entry["model"] for entry in kept.values()] == ["m"]
    with front_door(tmp_path, models, LAUNCHER_FOOTPRINTS_FILE=str(footprints)) as launcher:  # a restart remembers
        estimate = model_state(launcher, "m")["memory_estimate"]
        assert estimate["source"] == "measured" and estimate["host_bytes"] == next(iter(kept.values()))["host_bytes"]


def test_unpinned_profiles_are_placed_where_they_fit(tmp_path: Path) -> None:
    models = """\
models:
  p1: {options: "--model P1 --gpu-memory-utilization 0.4", share_gpu: true}
  p2: {options: "--model P2 --gpu-memory-utilization 0.4", share_gpu: true}
  p3: {options: "--model P3 --gpu-memory-utilization 0.4", share_gpu: true}
  whole: {options: "--model W"}
  pair: {options: "--model TP -tp 2"}
  wide: {options: "--model X -tp 3"}
"""
    with front_door(tmp_path, models, LAUNCHER_MOCK_GPUS="1", LAUNCHER_MOCK_GPU_COUNT="2") as launcher:

        def gpus_of(model: str) -> list[str]:
            return list(launcher.state(model_state(launcher, model)["instance_id"])["gpu_uuids"])

        for model in ("p1", "p2", "p3"):
            assert ask(launcher, model).status_code == 200
        # 0.4 of 80 GiB each: two share GPU-0 (64 of its 79 GiB), the third goes to GPU-1.
        assert [gpus_of(m) for m in ("p1", "p2", "p3")] == [["GPU-0"], ["GPU-0"], ["GPU-1"]]
        assert model_state(launcher, "p1")["memory_estimate"]["gpu_bytes"] == {"GPU-0": int(0.4 * 80 * GIB)}

        assert ask(launcher, "whole").status_code == 200  # 72 GiB: one GPU emptied, the least stopped
        assert [model_state(launcher, m)["state"] for m in ("p1", "p2", "p3")] == ["ready", "ready", "stopped"]
        assert gpus_of("whole") == ["GPU-1"]
        assert ask(launcher, "pair").status_code == 200  # tensor parallel 2: both GPUs
        assert gpus_of("pair") == ["GPU-0", "GPU-1"]
        refused = ask(launcher, "wide")
        assert refused.status_code == 503 and "needs 3 GPUs (--tensor-parallel-size), the node has 2" in refused.text


def test_instances_of_the_instance_api_count_but_are_never_stopped(tmp_path: Path) -> None:
    models = 'models:\n  g: {options: "--model G --gpu-memory-utilization 0.5", gpu_uuids: [GPU-0], share_gpu: true}\n'
    with front_door(tmp_path, models, LAUNCHER_MOCK_GPUS="1", LAUNCHER_MOCK_GPU_COUNT="1",
                    LAUNCHER_QUEUE_TIMEOUT="2") as launcher:  # fmt: skip
        own = launcher.create("mine", options=f"--model OWN --port {free_port()} --gpu-memory-utilization 0.5",
                              gpu_uuids=["GPU-0"])  # fmt: skip
        assert own.status_code == 201, own.text
        wait_until(lambda: launcher.state("mine").get("memory"), 20, what="its memory sample")
        assert launcher.state("mine")["memory"]["gpu_bytes"] == {"GPU-0": 40 * GIB}
        answer = ask(launcher, "g")  # 40 + 40 GiB > 79: it waits for room that never comes
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "no_room"
        assert launcher.state("mine")["status"] == "running"
        launcher.client.delete("/v2/vllm/instances/mine")
        assert ask(launcher, "g").status_code == 200
