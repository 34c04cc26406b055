"""Sleeping models (``idle: sleep``) with the stand-in, which serves vLLM's sleep endpoints as vLLM
documents them (``--enable-sleep-mode``, ``VLLM_SERVER_DEV_MODE=1``), on mock GPUs.

This tests the front door's side: the state machine (ready, sleeping, waking), requests during
sleep and wake, a failed wake (stop and start instead, never an error to the client), a
platform without sleep mode (vLLM on CPU: stopped instead), and the room policy's order (put to
sleep, then stop a sleeping one, then an idle awake one). vLLM's own sleep mode is measured on
a GPU (benchmarks/gpu/sleep_check.py).
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

from tests.launcher_process import LauncherProcess, WatchReader, wait_until
from tests.test_front_door_standin import ask, front_door, metric, model_state

GPU = {"LAUNCHER_MOCK_GPUS": "1", "LAUNCHER_MOCK_GPU_COUNT": "1"}
HALF = "--gpu-memory-utilization 0.5"


def instance_of(launcher: LauncherProcess, model: str) -> dict[str, object]:
    return launcher.state(str(model_state(launcher, model)["instance_id"]))


def wait_state(launcher: LauncherProcess, model: str, state: str, timeout: float = 20) -> None:
    wait_until(lambda: model_state(launcher, model)["state"] == state, timeout, what=f"{model} {state}")


def test_an_idle_model_sleeps_and_the_next_request_wakes_the_same_instance(tmp_path: Path) -> None:
    models = f"""\
models:
  nap: {{options: "--model N {HALF} --wake-delay 0.3", idle: sleep, idle_timeout: 1, gpu_uuids: [GPU-0]}}
  deep: {{options: "--model D {HALF}", idle: sleep, sleep_level: 2, idle_timeout: 1, gpu_uuids: [GPU-0],
          share_gpu: true}}
"""
    with front_door(tmp_path, models, **GPU) as launcher:
        watch = WatchReader(launcher)
        assert ask(launcher, "nap").status_code == 200
        first = instance_of(launcher, "nap")
        assert "--enable-sleep-mode" in str(first["options"]) and first["env_vars"] == {"VLLM_SERVER_DEV_MODE": "1", "CUDA_VISIBLE_DEVICES": "0"}
        wait_state(launcher, "nap", "sleeping")
        asleep = wait_until(lambda: (s := instance_of(launcher, "nap")).get("sleeping") and s, 10, what="asleep")
        assert asleep["status"] == "running" and asleep["pid"] == first["pid"]
        wait_until(lambda: (instance_of(launcher, "nap").get("memory") or {}).get("gpu_bytes") == {"GPU-0": 2**30},
                   10, what="a sleeping instance's GPU memory")  # fmt: skip
        assert metric(launcher, "launcher_front_door_sleeps_total", model="nap", reason="idle") == 1
        assert "\nlauncher_front_door_sleeping 1.0\n" in launcher.client.get("/metrics").text
        assert [m["state"] for m in launcher.client.get("/v1/models").json()["data"]][0] == "sleeping"

        answer = ask(launcher, "nap")
        assert answer.status_code == 200 and "garbage" not in answer.json()
        awake = instance_of(launcher, "nap")
        assert awake["pid"] == first["pid"] and "sleeping" not in awake  # woken, not started again
        assert metric(launcher, "launcher_front_door_wakes_total", model="nap", outcome="ok") == 1
        assert metric(launcher, "launcher_front_door_starts_total", model="nap", outcome="ready") == 1
        types = [e["type"] for e in watch.events if e["object"].get("instance_id") == first["instance_id"]]
        assert types[:4] == ["CREATED", "READY", "MODIFIED", "MODIFIED"], types  # asleep, then awake
        watch.close()

        # Level 2 drops the weights: the wake reloads them (no garbage after).
        assert ask(launcher, "deep").status_code == 200
        wait_state(launcher, "deep", "sleeping")
        answer = ask(launcher, "deep")
        assert answer.status_code == 200 and "garbage" not in answer.json(), answer.json()


def test_requests_during_a_wake_share_it(tmp_path: Path) -> None:
    models = f'models:\n  nap: {{options: "--model N {HALF} --wake-delay 1.5", idle: sleep, idle_timeout: 1}}\n'
    with front_door(tmp_path, models, **GPU) as launcher:
        assert ask(launcher, "nap").status_code == 200
        wait_state(launcher, "nap", "sleeping")
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            first = pool.submit(ask, launcher, "nap")
            wait_state(launcher, "nap", "waking", 5)
            rest = [pool.submit(ask, launcher, "nap") for _ in range(3)]
            answers = [first.result(), *(future.result() for future in rest)]
        assert [answer.status_code for answer in answers] == [200] * 4
        assert metric(launcher, "launcher_front_door_wakes_total", model="nap", outcome="ok") == 1


def test_a_failed_wake_starts_it_afresh_and_the_client_never_sees_it(tmp_path: Path) -> None:
    models = f'models:\n  nap: {{options: "--model N {HALF} --fail-wake", idle: sleep, idle_timeout: 1}}\n'
    with front_door(tmp_path, models, **GPU) as launcher:
        assert ask(launcher, "nap").status_code == 200
        first = instance_of(launcher, "nap")["instance_id"]
        wait_state(launcher, "nap", "sleeping")
        assert ask(launcher, "nap").status_code == 200
        assert instance_of(launcher, "nap")["instance_id"] != first  # stopped, then started again
        assert metric(launcher, "launcher_front_door_wakes_total", model="nap", outcome="failed") == 1
        assert metric(launcher, "launcher_front_door_starts_total", model="nap", outcome="ready") == 2
        assert "could not wake instance" in launcher.output_text()


def test_without_sleep_mode_an_idle_model_is_stopped_said_once(tmp_path: Path) -> None:
    models = 'models:\n  nap: {options: "--model N", idle: sleep, idle_timeout: 1}\n'
    with front_door(tmp_path, models, STANDIN_NO_SLEEP_MODE="1", **GPU) as launcher:
        for _ in range(2):
            assert ask(launcher, "nap").status_code == 200
            assert "--enable-sleep-mode" not in str(instance_of(launcher, "nap")["options"])
            wait_state(launcher, "nap", "stopped")
        assert launcher.output_text().count("instances here have no sleep mode") == 1


def test_room_is_made_by_sleep_first_then_by_stopping_a_sleeper_then_an_awake_one(tmp_path: Path) -> None:
    models = f"""\
models:
  s1: {{options: "--model S1 {HALF}", idle: sleep, idle_timeout: 0, gpu_uuids: [GPU-0], share_gpu: true}}
  s2: {{options: "--model S2 {HALF}", idle: sleep, idle_timeout: 0, gpu_uuids: [GPU-0], share_gpu: true}}
  a: {{options: "--model A {HALF}", idle_timeout: 0, gpu_uuids: [GPU-0], share_gpu: true}}
"""
    with front_door(tmp_path, models, LAUNCHER_MAX_INSTANCES="3", **GPU) as launcher:
        assert ask(launcher, "s1").status_code == 200
        assert ask(launcher, "s2").status_code == 200  # 40 + 40 GiB > 79: s1 is put to sleep
        assert [model_state(launcher, m)["state"] for m in ("s1", "s2")] == ["sleeping", "ready"]
        assert metric(launcher, "launcher_front_door_sleeps_total", model="s1", reason="room") == 1
        assert ask(launcher, "a").status_code == 200  # s2 to sleep (it can), not stopped
        assert [model_state(launcher, m)["state"] for m in ("s1", "s2", "a")] == ["sleeping", "sleeping", "ready"]
        # Waking s1 needs its 40 GiB back, and a third instance slot is taken by the sleepers: a sleeping
        # one is stopped before the awake, idle a is.
        (tmp_path / "again").mkdir()
        with front_door(tmp_path / "again", models, LAUNCHER_MAX_INSTANCES="2", **GPU) as small:
            assert ask(small, "s1").status_code == 200
            assert ask(small, "s2").status_code == 200  # s1 sleeps
            assert ask(small, "a").status_code == 200  # count full (2): the sleeping s1 is stopped, s2 sleeps
            assert [model_state(small, m)["state"] for m in ("s1", "s2", "a")] == ["stopped", "sleeping", "ready"]
        answer = ask(launcher, "s1")  # wakes: a (awake, cannot sleep) is stopped for its GPU memory
        assert answer.status_code == 200
        states = {m: model_state(launcher, m) for m in ("s1", "s2", "a")}
        assert [states[m]["state"] for m in ("s1", "s2", "a")] == ["ready", "sleeping", "stopped"], states
