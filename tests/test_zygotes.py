"""The zygote lifecycle with the stand-in (fast): instances fork from one zygote per model,
stay the forkserver's children, survive their zygote, and leave nothing behind; a zygote that
fails, or dies while a spawn waits on it, never fails the spawn (it forks directly)."""

from __future__ import annotations

import os
import signal
import time

import psutil

from tests.launcher_process import LauncherProcess, free_port, process_alive, wait_until

SHARE = "--share-weights-mib 64"


def _create(launcher: LauncherProcess, instance_id: str, flags: str = SHARE) -> dict:
    response = launcher.create(instance_id, options=f"--model m --port {free_port()} {flags}")
    assert response.status_code == 201, response.text
    return wait_until(lambda: (s := launcher.state(instance_id))["ready"] and s, 30, 0.05, f"{instance_id} ready")


def _weights_line(launcher: LauncherProcess, instance_id: str) -> str:
    def line() -> str | None:
        log = launcher.client.get(f"/v2/vllm/instances/{instance_id}/log").text
        return next((text for text in log.splitlines() if text.startswith("WEIGHTS ")), None)

    return str(wait_until(line, 10, 0.05, f"{instance_id}'s WEIGHTS line"))


def _zygotes(launcher: LauncherProcess) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.forkserver_pid()).children() if p.name() == "vllm-zygote"]


def test_instances_of_one_model_fork_from_one_zygote_that_goes_with_the_last(standin: LauncherProcess) -> None:
    forkserver = standin.forkserver_pid()
    first, second = _create(standin, "z-a"), _create(standin, "z-b")
    (zygote,) = _zygotes(standin)
    for state in (first, second):
        assert _weights_line(standin, state["instance_id"]) == f"WEIGHTS FROM {zygote.pid}"
        assert psutil.Process(state["pid"]).ppid() == forkserver
        assert os.getsid(state["pid"]) == state["pid"]  # its own session, as a direct fork
    other = _create(standin, "z-other", SHARE + " --zygote-load-delay 0.01")  # other flags: another zygote
    assert len(_zygotes(standin)) == 2
    assert _weights_line(standin, other["instance_id"]) != f"WEIGHTS FROM {zygote.pid}"
    assert standin.client.delete("/v2/vllm/instances/z-other").status_code == 200
    wait_until(lambda: len(_zygotes(standin)) == 1, 10, 0.05, "the other zygote to go")
    assert standin.client.delete("/v2/vllm/instances/z-a").status_code == 200
    assert process_alive(zygote.pid)  # an instance forked from it is left
    assert standin.client.delete("/v2/vllm/instances/z-b").status_code == 200
    wait_until(lambda: not process_alive(zygote.pid), 10, 0.05, "the zygote to go with its last instance")
    assert not psutil.Process(forkserver).children()


def test_a_killed_zygote_takes_no_instance_and_is_replaced(standin: LauncherProcess) -> None:
    first = _create(standin, "k-a")
    (zygote,) = _zygotes(standin)
    os.kill(zygote.pid, signal.SIGKILL)
    wait_until(lambda: not process_alive(zygote.pid), 10, 0.05, "the zygote to go")
    time.sleep(0.3)
    assert standin.state("k-a")["status"] == "running"
    second = _create(standin, "k-b")
    (replacement,) = _zygotes(standin)
    assert replacement.pid != zygote.pid
    assert _weights_line(standin, "k-b") == f"WEIGHTS FROM {replacement.pid}"
    assert process_alive(first["pid"]) and process_alive(second["pid"])


def test_a_zygote_that_cannot_load_falls_back_to_a_direct_fork(standin: LauncherProcess) -> None:
    state = _create(standin, "fail", SHARE + " --zygote-fail")
    assert _weights_line(standin, "fail") == "WEIGHTS OWN"
    assert not _zygotes(standin)
    assert psutil.Process(state["pid"]).ppid() == standin.forkserver_pid()


def test_a_spawn_waiting_on_a_zygote_that_dies_forks_directly(standin: LauncherProcess) -> None:
    import threading

    answers: dict[str, int] = {}
    flags = SHARE + " --zygote-load-delay 30"
    creating = threading.Thread(
        target=lambda: answers.update(code=standin.create("slow", options=f"--model m --port {free_port()} {flags}").status_code)
    )
    creating.start()
    zygote = wait_until(lambda: next(iter(_zygotes(standin)), None), 10, 0.05, "the zygote")
    os.kill(zygote.pid, signal.SIGKILL)
    creating.join(10)
    assert answers.get("code") == 201
    assert _weights_line(standin, "slow") == "WEIGHTS OWN"
