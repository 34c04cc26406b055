"""Weight sharing under faults a reviewer found (issue 32): a DELETE while a create waits on its
zygote, a zygote that hangs, the zygote's copy of the weights in the memory accounting, a model
changed on disk, what a zygote holds when it forks, the opt-out. Each failed before its fix.

Stand-in tests are fast; the ``vllm`` ones use the real vLLM and the tiny model.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from forkserver import protocol
from launcher.instances import memory
from tests.conftest import real_vllm_launcher
from tests.launcher_process import (
    REPO,
    SERVE_FLAGS,
    LauncherProcess,
    free_port,
    start_ready,
    start_standalone_forkserver,
    wait_until,
)
from tests.test_front_door_standin import ask, front_door, instances_of, model_state
from tests.test_weight_sharing import greedy_tokens

MIB = 2**20


def _zygotes(launcher: LauncherProcess) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.forkserver_pid()).children() if p.name() == "vllm-zygote"]


# --------------------------------------------------------------------------- stand-in (fast)


def _cancelled_creates(launcher: LauncherProcess) -> float:
    prefix = 'launcher_instance_create_failures_total{reason="cancelled"} '
    lines = [line for line in launcher.client.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


def test_a_delete_while_the_spawn_waits_on_the_zygote_takes_it_back(standin: LauncherProcess) -> None:
    """A DELETE of an instance whose PUT waits on its model's zygote (a load that may take minutes)
    takes the create back at once: the DELETE is a 200, the PUT a 409, nothing runs or is left, and
    the zygote, with nothing left to fork, is retired (never a 404 that leaves an instance running)."""
    answers: dict[str, httpx.Response] = {}
    cancelled_before = _cancelled_creates(standin)
    options = f"--model m --port {free_port()} --share-weights-mib 16 --zygote-load-delay 120"
    creating = threading.Thread(target=lambda: answers.update(put=standin.create("wait", options=options)))
    creating.start()
    wait_until(lambda: _zygotes(standin), 10, 0.05, "the zygote")
    deleted = standin.client.delete("/v2/vllm/instances/wait", timeout=30)
    creating.join(30)
    assert deleted.status_code == 200 and deleted.json()["status"] == "terminated", deleted.text
    assert answers["put"].status_code == 409 and "deleted before it was forked" in answers["put"].text
    assert _cancelled_creates(standin) == cancelled_before + 1  # counted as taken back, not as a conflict
    assert standin.client.get("/v2/vllm/instances/wait").status_code == 404
    assert not (standin.log_dir / "wait.log").exists()
    wait_until(lambda: not _zygotes(standin), 10, 0.05, "the zygote to be retired")
    assert standin.create("wait", options=f"--model m --port {free_port()}").status_code == 201  # the id is free
    assert standin.client.delete("/v2/vllm/instances/wait").status_code == 200


@pytest.mark.parametrize("how", ["start_timeout", "stop"])
def test_a_front_door_start_waiting_for_its_weights_ends_at_its_deadline_or_a_stop(tmp_path: Path, how: str) -> None:
    """The profile's start_timeout bounds the whole start, its weights' load included, and a stop
    cancels such a start instead of waiting for the load (docs/front-door.md)."""
    timeout = ", start_timeout: 1" if how == "start_timeout" else ""
    models = f'models:\n  slow: {{options: "--model S --share-weights-mib 16 --zygote-load-delay 120"{timeout}}}\n'
    with front_door(tmp_path, models) as launcher, concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(ask, launcher, "slow")
        wait_until(lambda: _zygotes(launcher), 10, 0.05, "the zygote")
        if how == "stop":
            stopped = launcher.client.post("/v2/vllm/models/slow/stop", timeout=20)
            assert stopped.status_code == 200 and stopped.json()["state"] == "failed", stopped.text
            assert "start was cancelled (stopped)" in waiting.result(timeout=20).json()["error"]["message"]
        else:
            answer = waiting.result(timeout=20)
            assert answer.status_code == 502 and "(start_timeout)" in answer.json()["error"]["message"], answer.text
            assert model_state(launcher, "slow")["state"] == "failed"
        assert instances_of(launcher, "slow") == []
        wait_until(lambda: not _zygotes(launcher), 10, 0.05, "the zygote to be retired")


def test_a_create_waiting_on_its_zygote_at_shutdown_leaves_no_log_behind() -> None:
    launcher = LauncherProcess(env={"LAUNCHER_LOG_DIR": ""})  # the default: under the launcher's TMPDIR
    options = "--model m --share-weights-mib 16 --zygote-load-delay 30"
    threading.Thread(target=lambda: launcher.create("w", options=options), daemon=True).start()
    wait_until(lambda: _zygotes(launcher), 10, 0.05, "the zygote")
    launcher.process.send_signal(signal.SIGTERM)
    launcher.process.wait(60)
    logs = [str(path.relative_to(launcher.workdir)) for path in launcher.workdir.rglob("*.log")]
    assert not launcher.stop()
    assert logs == []


def _forkserver_children(forkserver: subprocess.Popen[bytes]) -> list[str]:
    return sorted(child.name() for child in psutil.Process(forkserver.pid).children())


def test_creates_waiting_on_a_zygote_when_their_api_goes_are_dropped_or_adopted(tmp_path: Path) -> None:
    """A standalone forkserver outlives its API (FMA's pods). A create still waiting for its zygote's
    load when the API goes failed for its client: it is never forked later, unseen by the next API,
    which may create that id afresh. One whose fork was already asked is adopted by the next API."""
    socket_path = str(tmp_path / "run" / "fs.sock")
    forkserver = start_standalone_forkserver(socket_path)
    env = {"LAUNCHER_FORKSERVER_SOCKET": socket_path, "LAUNCHER_LOG_DIR": str(tmp_path / "logs")}
    shared = "--model m --share-weights-mib 16"

    def put_in_background(launcher: LauncherProcess, instance_id: str, options: str) -> threading.Thread:
        def put() -> None:
            with contextlib.suppress(httpx.HTTPError):  # its API goes away meanwhile
                launcher.create(instance_id, options=options)

        thread = threading.Thread(target=put, daemon=True)
        thread.start()
        return thread

    def zygotes() -> list[psutil.Process]:
        return [p for p in psutil.Process(forkserver.pid).children() if p.name() == "vllm-zygote"]

    try:
        first = LauncherProcess(env=env)
        put_in_background(first, "w", f"{shared} --zygote-load-delay 3")
        wait_until(zygotes, 10, 0.05, "the zygote")
        first.process.kill()  # the API dies (a graceful stop would wait up to 5 s for its PUT)
        first.stop()
        second = LauncherProcess(env=env)
        try:
            again = second.create("w", options="--model m")
            assert again.status_code == 201, again.text  # not "already exists": the first API's w is gone
            time.sleep(4)  # past the first zygote's load: nothing is forked for the API that left
            assert _forkserver_children(forkserver) == ["vllm-instance"], _forkserver_children(forkserver)
            assert second.client.delete("/v2/vllm/instances/w").status_code == 200
            # A fork asked of a zygote that answers only once its API is gone: adopted by the next one.
            assert second.create("ready", options=shared).status_code == 201
            # Ready: it has its own name by then (forked from the zygote, it starts with the zygote's).
            wait_until(lambda: second.state("ready")["ready"], 10, 0.05, "ready")
            (zygote,) = zygotes()
            os.kill(zygote.pid, signal.SIGSTOP)
            put_in_background(second, "late", shared)
            time.sleep(0.5)  # the fork request is with the stopped zygote
        finally:
            second.process.kill()
            second.stop()
        third = LauncherProcess(env=env)
        try:
            os.kill(zygote.pid, signal.SIGCONT)
            wait_until(lambda: third.client.get("/v2/vllm/instances/late").status_code == 200, 20, 0.05, "late adopted")
            assert third.client.delete("/v2/vllm/instances").status_code == 200
            wait_until(lambda: "vllm-instance" not in _forkserver_children(forkserver), 10, what="no instance left")
        finally:
            third.stop()
    finally:
        forkserver.terminate()
        forkserver.wait(30)


def test_a_hung_zygote_is_given_up_and_the_create_forks_directly(standin: LauncherProcess) -> None:
    """A zygote that stops answering (stopped, deadlocked in a fork) is given up after
    forkserver/zygotes.py's FORK_TIMEOUT: the waiting create forks directly, and answers."""
    assert standin.create("first", options=f"--model m --port {free_port()} --share-weights-mib 16").status_code == 201
    (zygote,) = _zygotes(standin)
    os.kill(zygote.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        try:
            code = httpx.put(
                f"{standin.base_url}/v2/vllm/instances/second",
                json={"options": f"--model m --port {free_port()} --share-weights-mib 16"},
                timeout=20,
            ).status_code
        except httpx.TimeoutException:
            code = None
        assert code == 201, (
            f"PUT unanswered after {time.monotonic() - started:.0f}s; "
            f"GET {standin.client.get('/v2/vllm/instances/second').status_code}, "
            f"DELETE {standin.client.delete('/v2/vllm/instances/second').status_code}"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(zygote.pid, signal.SIGCONT)  # given up: killed by the forkserver by now
        wait_until(lambda: standin.client.get("/v2/vllm/instances/second").status_code == 200, 10, 0.05, "second")


def test_the_zygotes_copy_of_the_weights_is_counted_somewhere(standin: LauncherProcess) -> None:
    """The instances' ``memory.host_bytes`` (the front door's room by memory, the metrics) add up to
    what the node spends: each instance counts its share of its zygote's copy of the weights."""
    response = standin.create("acct", options=f"--model m --port {free_port()} --share-weights-mib 512")
    assert response.status_code == 201, response.text
    state = wait_until(lambda: (s := standin.state("acct")).get("memory") and s, 20, 0.2, "a memory sample")
    time.sleep(2.5)  # a sample taken after the stand-in has started
    reported = standin.state("acct")["memory"]["host_bytes"]
    (zygote,) = wait_until(lambda: len(z := _zygotes(standin)) == 1 and z, 10, 0.1, "one zygote")
    spent = memory.pss_bytes(memory.process_tree(state["pid"])) + memory.pss_bytes([zygote.pid])
    metrics = standin.client.get("/metrics").text
    assert reported >= 0.9 * spent, (reported / MIB, spent / MIB, "zygote" in metrics)


# --------------------------------------------------------------------------- real vLLM (tiny model)


_NEGATE_LM_HEAD = """
import sys
from safetensors.torch import load_file, save_file
tensors = load_file(sys.argv[1])
tensors["lm_head.weight"] = -tensors["lm_head.weight"]
save_file(tensors, sys.argv[1], metadata={"format": "pt"})
"""


@pytest.mark.vllm
def test_an_instance_started_after_its_model_changed_on_disk_serves_the_new_weights(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The sharing key holds the model files' identity (inode, size, mtime): a checkpoint written
    again in place while a zygote of it lives gets a new zygote, never the old weights."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    with real_vllm_launcher() as launcher:
        start_ready(launcher, "before", model)
        subprocess.run([sys.executable, "-c", _NEGATE_LM_HEAD, str(model / "model.safetensors")], check=True, cwd=REPO)
        shared = start_ready(launcher, "after", model)
        own = start_ready(launcher, "own", model, env_vars={"LAUNCHER_SHARE_WEIGHTS": "0"})
        assert shared["start_phases"]["weights_shared"] == 1.0
        assert greedy_tokens(shared, model) == greedy_tokens(own, model)
        assert launcher.client.delete("/v2/vllm/instances").status_code == 200


_LOAD_IN_A_ZYGOTE = """
import os, sys, tempfile, threading
from forkserver.vllm_workload import WORKLOAD
from forkserver.workload import WorkloadOptions
from forkserver import fork_safety
WORKLOAD.configure(WorkloadOptions())
WORKLOAD.preload(None)
before = set(fork_safety.extra_threads())
parsed = WORKLOAD.parse(["--model", sys.argv[1], *sys.argv[2].split()])
WORKLOAD.load_shared(parsed, tempfile.mkdtemp())
threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
shared = sorted({line.split(None, 5)[-1].strip() for line in open("/proc/self/maps") if line.split()[1].endswith("s")})
print("THREADS", threads)
print("SHARED", shared)
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.vllm
def test_a_zygote_forks_with_no_thread_and_no_cross_process_lock(tiny_model: Path) -> None:
    """A zygote forks with no thread but its own and no lock shared across processes: vLLM's load
    bar left tqdm's monitor thread (a fork while it holds tqdm's lock gives the child a lock held
    for ever) and tqdm's multiprocessing lock (a /dev/shm semaphore every instance would share)."""
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_A_ZYGOTE, str(tiny_model), SERVE_FLAGS],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = {line.split(" ", 1)[0]: line for line in done.stdout.splitlines() if line.startswith(("THREADS", "SHARED"))}
    assert "THREADS" in lines, done.stderr[-3000:]
    assert lines["THREADS"] == "THREADS []", lines
    assert "/dev/shm" not in lines["SHARED"], lines


def test_the_stand_in_honours_no_share_weights() -> None:
    """``LAUNCHER_SHARE_WEIGHTS=0`` (``--no-share-weights``) turns sharing off, for the stand-in too."""
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_SHARE_WEIGHTS": "0"})
    try:
        assert launcher.create("x", options=f"--model m --port {free_port()} --share-weights-mib 16").status_code == 201

        def line() -> str | None:
            log = launcher.client.get("/v2/vllm/instances/x/log").text
            return next((text for text in log.splitlines() if text.startswith("WEIGHTS ")), None)

        assert wait_until(line, 10, 0.05, "the WEIGHTS line") == "WEIGHTS OWN"
    finally:
        assert not launcher.stop()


@contextlib.contextmanager
def _standalone(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str]]]:
    """A stand-in forkserver started on its own, and the environment of an API that attaches to it."""
    socket_path = str(tmp_path / "run" / "fs.sock")
    forkserver = start_standalone_forkserver(socket_path)
    try:
        yield forkserver, {"LAUNCHER_FORKSERVER_SOCKET": socket_path, "LAUNCHER_LOG_DIR": str(tmp_path / "logs")}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(forkserver.pid, signal.SIGCONT)
        forkserver.terminate()
        forkserver.wait(30)


def test_a_cancel_takes_back_only_the_asking_clients_spawn(tmp_path: Path) -> None:
    """Another client of the forkserver's socket (a second API, a tool) cannot take back this API's create."""
    with _standalone(tmp_path) as (forkserver, env):
        api = LauncherProcess(env=env)
        try:
            answers: dict[str, httpx.Response] = {}
            options = "--model m --share-weights-mib 16 --zygote-load-delay 2"
            creating = threading.Thread(target=lambda: answers.update(put=api.create("w", options=options)))
            creating.start()
            wait_until(lambda: [p for p in psutil.Process(forkserver.pid).children() if p.name() == "vllm-zygote"],
                       10, 0.05, "the zygote")  # fmt: skip
            with socket.socket(socket.AF_UNIX) as other:
                other.connect(env["LAUNCHER_FORKSERVER_SOCKET"])
                other.sendall(protocol.encode({"op": protocol.OP_CANCEL, "instance_id": "w", "id": 1}))
                frames, replies = protocol.FrameBuffer(), []
                while not replies:
                    replies = frames.feed(other.recv(65536))
            assert replies[0]["ok"] and replies[0]["cancelled"] is False, replies
            creating.join(30)
            assert answers["put"].status_code == 201, answers["put"].text
            assert api.client.delete("/v2/vllm/instances/w").status_code == 200
        finally:
            assert not api.stop()


def test_a_delete_racing_a_create_that_fails_by_itself_is_a_404(tmp_path: Path) -> None:
    """The DELETE took nothing back (the create failed on its own options): no instance, no "terminated"."""
    with _standalone(tmp_path) as (forkserver, env):
        api = LauncherProcess(env=env)
        try:
            answers: dict[str, httpx.Response] = {}
            os.kill(forkserver.pid, signal.SIGSTOP)  # a busy forkserver: the create is still validating
            creating = threading.Thread(target=lambda: answers.update(put=api.create("w", options="--model m --bad")))
            creating.start()
            time.sleep(0.5)
            deleting = threading.Thread(target=lambda: answers.update(delete=api.client.delete("/v2/vllm/instances/w")))
            deleting.start()
            time.sleep(0.5)
            os.kill(forkserver.pid, signal.SIGCONT)
            creating.join(30)
            deleting.join(30)
            assert answers["put"].status_code == 400, answers["put"].text
            assert answers["delete"].status_code == 404, answers["delete"].text
        finally:
            assert not api.stop()


def test_an_instance_forked_for_a_gone_api_while_the_next_creates_its_id_is_listed(tmp_path: Path) -> None:
    """API A's fork of "late" was asked (its zygote stopped), A died; API B's own PUT of "late" is under
    way when the fork lands: B's create fails on it (409), and B lists A's instance, deletable."""
    shared = "--model m --share-weights-mib 16"
    with _standalone(tmp_path) as (forkserver, env):
        first = LauncherProcess(env=env)
        try:
            assert first.create("ready", options=shared).status_code == 201
            wait_until(lambda: first.state("ready")["ready"], 20, 0.05, "ready")
            (zygote,) = [p for p in psutil.Process(forkserver.pid).children() if p.name() == "vllm-zygote"]
            os.kill(zygote.pid, signal.SIGSTOP)  # the next fork request waits with the zygote

            def put_late() -> None:
                with contextlib.suppress(httpx.HTTPError):  # its API dies meanwhile
                    first.create("late", options=shared)

            threading.Thread(target=put_late, daemon=True).start()
            time.sleep(0.7)
        finally:
            first.process.kill()
            first.stop()
        second = LauncherProcess(env=env)
        try:
            answers: dict[str, httpx.Response] = {}
            os.kill(forkserver.pid, signal.SIGSTOP)  # B's create of "late" waits on a busy forkserver
            creating = threading.Thread(target=lambda: answers.update(put=second.create("late", options=shared)))
            creating.start()
            time.sleep(0.7)
            os.kill(zygote.pid, signal.SIGCONT)  # A's "late" is forked; its event reaches B before B's spawn
            time.sleep(0.7)
            os.kill(forkserver.pid, signal.SIGCONT)
            creating.join(30)
            assert answers["put"].status_code == 409, answers["put"].text
            wait_until(lambda: second.client.get("/v2/vllm/instances/late").status_code == 200, 10, 0.05, "late listed")
            assert second.client.delete("/v2/vllm/instances").status_code == 200
            wait_until(lambda: "vllm-instance" not in _forkserver_children(forkserver), 10, what="no instance left")
        finally:
            second.stop()
