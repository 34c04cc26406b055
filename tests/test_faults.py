"""The fault matrix on real processes (stand-in workload): every fault survived, nothing orphaned."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from multiprocessing import shared_memory
from pathlib import Path

import psutil
import pytest

from tests.launcher_process import (
    REPO,
    LauncherProcess,
    free_port,
    process_alive,
    start_standalone_forkserver,
    wait_until,
)


def _options(extra: str = "") -> str:
    return f"--model standin-model --port {free_port()} {extra}".strip()


def _instance_tree(launcher: LauncherProcess, instance_id: str) -> list[int]:
    pid = launcher.state(instance_id)["pid"]
    wait_until(lambda: process_alive(pid), 5, what="the instance")
    return [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]


def test_killed_forkserver_takes_its_instances_and_is_replaced() -> None:
    launcher = LauncherProcess(workload="standin")
    try:
        assert launcher.create("one", options=_options("--spawn-helper")).status_code == 201
        assert launcher.create("two", options=_options()).status_code == 201
        wait_until(lambda: len(psutil.Process(launcher.state("one")["pid"]).children()) == 1, 10, what="helper")
        doomed = _instance_tree(launcher, "one") + _instance_tree(launcher, "two")
        old_forkserver = launcher.forkserver_pid()
        os.kill(old_forkserver, signal.SIGKILL)
        for name in ("one", "two"):
            state = wait_until(lambda n=name: (s := launcher.state(n))["status"] == "stopped" and s, 10, what=name)
            assert "forkserver" in state["stop_reason"]
        wait_until(lambda: not [pid for pid in doomed if process_alive(pid)], 10, what="the instances to die with it")
        wait_until(lambda: launcher.client.get("/health").status_code == 200, 30, what="a new forkserver")
        assert launcher.forkserver_pid() != old_forkserver
        assert launcher.create("three", options=_options()).status_code == 201
        wait_until(lambda: launcher.state("three")["ready"], 10, what="three ready")
        assert launcher.client.get("/v2/vllm/instances/one/log").status_code == 200  # still readable
        assert launcher.client.delete("/v2/vllm/instances/one").status_code == 200
    finally:
        assert not launcher.stop()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_launcher_end_leaves_no_process(sig: int) -> None:
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_STOP_TIMEOUT": "2"})
    assert launcher.create("plain", options=_options("--spawn-helper")).status_code == 201
    assert launcher.create("stubborn", options=_options("--ignore-sigterm")).status_code == 201
    wait_until(lambda: len(launcher.descendants()) >= 4, 10, what="forkserver, instances and helper")
    started = time.monotonic()
    leftovers = launcher.stop(sig)  # waits for the launcher, then up to 10 s for its tree
    elapsed = time.monotonic() - started
    assert leftovers == []
    if sig != signal.SIGKILL:
        # uvicorn re-raises the signal after a clean shutdown (Ctrl-C: exit 130, no traceback).
        assert launcher.process.returncode in (0, -sig, 130)
        # The graceful path: SIGTERM, the 2 s deadline for the stubborn one, then SIGKILL; no hang.
        assert 1.5 <= elapsed < 30


def test_concurrent_delete_and_get_of_one_instance(standin: LauncherProcess) -> None:
    for round_number in range(5):
        name = f"contested-{round_number}"
        assert standin.create(name, options=_options()).status_code == 201
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            deletes = [pool.submit(standin.client.delete, f"/v2/vllm/instances/{name}") for _ in range(3)]
            gets = [pool.submit(standin.client.get, f"/v2/vllm/instances/{name}") for _ in range(5)]
            delete_codes = sorted(f.result().status_code for f in deletes)
            get_codes = {f.result().status_code for f in gets}
        assert delete_codes[0] == 200 and set(delete_codes) <= {200, 404}
        assert get_codes <= {200, 404}
        assert standin.client.get(f"/v2/vllm/instances/{name}").status_code == 404


def test_a_standalone_forkserver_outlives_an_api_restart() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="fs-alone-"))
    socket_path = str(workdir / "run" / "fs.sock")
    forkserver = start_standalone_forkserver(socket_path)
    env = {"LAUNCHER_FORKSERVER_SOCKET": socket_path, "LAUNCHER_LOG_DIR": str(workdir / "logs")}
    try:
        first = LauncherProcess(workload="standin", env=env)
        assert first.create("keeper", options=_options("--print-env KEEP"), env_vars={"KEEP": "me"},
                            annotations={"owner": "test"}).status_code == 201  # fmt: skip
        assert first.create("quitter", options=_options("--crash-after 0.2 --exit-code 4")).status_code == 201
        wait_until(lambda: first.state("keeper")["ready"], 10, what="keeper ready")
        wait_until(lambda: first.state("quitter")["status"] == "stopped", 10, what="quitter to stop")
        keeper = first.state("keeper")
        log = first.client.get("/v2/vllm/instances/keeper/log").content
        assert first.stop() == []  # it has no descendants: the forkserver is not its child
        assert process_alive(keeper["pid"]), "the instance must outlive the API"

        second = LauncherProcess(workload="standin", env=env)
        try:
            again = second.state("keeper")
            for key in ("pid", "port", "model", "options", "env_vars", "annotations", "created_at", "ready_at"):
                assert again[key] == keeper[key], key
            assert again["status"] == "running" and again["ready"]
            quitter = second.state("quitter")
            assert quitter["status"] == "stopped" and quitter["exit_code"] == 4
            assert second.client.get("/v2/vllm/instances/keeper/log").content.startswith(log)
            assert b"ENV KEEP=me" in log
            assert second.client.delete("/v2/vllm/instances/keeper").status_code == 200
            assert not process_alive(keeper["pid"])
        finally:
            second.stop()
    finally:
        forkserver.send_signal(signal.SIGTERM)
        forkserver.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)


def test_bearer_token_guards_everything_but_health() -> None:
    token_file = Path(tempfile.mkdtemp(prefix="tok-")) / "token"
    token_file.write_text("s3cret-token\n")
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_API_TOKEN_FILE": str(token_file)})
    try:
        assert launcher.client.get("/health").status_code == 200
        for method, path in [("GET", "/"), ("GET", "/v2/vllm/instances"), ("DELETE", "/v2/vllm/instances"),
                             ("GET", "/v2/vllm/instances/x/log"), ("GET", "/v2/vllm/instances/watch"),
                             ("PUT", "/v2/vllm/instances/x"), ("GET", "/v2/vllm/gpus"), ("GET", "/nope")]:  # fmt: skip
            response = launcher.client.request(method, path)
            assert response.status_code == 401, (method, path)
            assert "token" in response.json()["detail"]
            wrong = launcher.client.request(method, path, headers={"Authorization": "Bearer s3cret-tokeN"})
            assert wrong.status_code == 401
        good = {"Authorization": "Bearer s3cret-token"}
        assert launcher.client.get("/v2/vllm/instances", headers=good).status_code == 200
        assert launcher.client.put("/v2/vllm/instances/ok", json={"options": _options()}, headers=good).status_code == 201
    finally:
        assert not launcher.stop()
        token_file.unlink()
        token_file.parent.rmdir()


def test_private_files_have_private_modes(standin: LauncherProcess) -> None:
    assert standin.create("modes", options=_options()).status_code == 201
    assert stat.S_IMODE(os.stat(standin.log_dir / "modes.log").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(standin.runtime_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(standin.runtime_dir / "forkserver.sock").st_mode) == 0o600


def test_the_forkserver_survives_clients_that_misbehave(standin: LauncherProcess) -> None:
    socket_path = str(standin.runtime_dir / "forkserver.sock")
    for payload in (b"", b"\x00\x00", b"\xff\xff\xff\xff", b"\x00\x00\x00\x05hello", b"\x00\x00\x00\x02{}"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(socket_path)
            sock.sendall(payload)
    assert standin.create("after-garbage", options=_options()).status_code == 201
    assert standin.client.get("/health").status_code == 200


def test_start_up_sweeps_what_a_killed_launcher_left_and_nothing_else(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"  # the launcher's TMPDIR, where launchers keep their runtime dirs
    temp.mkdir()
    stale = Path(tempfile.mkdtemp(prefix="vllm-launcher-", dir=temp))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (stale / "api.pid").write_text(str(dead.pid))
    (stale / "forkserver.sock").write_text("")
    # Another program's file of a vLLM-like name, old and mapped by nobody: no ledger lists it.
    theirs = Path(f"/dev/shm/psm_launcher_test_theirs_{os.getpid()}")
    theirs.write_bytes(b"x" * 16)
    # A segment a dead forkserver's ledger lists, and one it lists that was made again since.
    listed = Path(f"/dev/shm/psm_launcher_test_listed_{os.getpid()}")
    listed.write_bytes(b"x" * 16)
    remade = Path(f"/dev/shm/psm_launcher_test_remade_{os.getpid()}")
    remade.write_bytes(b"x" * 16)
    old_inode = remade.stat().st_ino
    ledger = temp / f"vllm-launcher-{os.getuid()}" / "shm-ledger"
    ledger.mkdir(parents=True)
    (ledger / f"{dead.pid}.gone").write_text(json.dumps([[listed.name, listed.stat().st_ino],
                                                          [remade.name, old_inode]]))  # fmt: skip
    remade.unlink()
    remade.write_bytes(b"y" * 16)  # the same name, another file (tmpfs gives it a new inode)
    assert remade.stat().st_ino != old_inode
    in_use = shared_memory.SharedMemory(create=True, size=16)  # mapped by this process
    for path in (theirs, Path("/dev/shm") / in_use.name):
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    launcher = LauncherProcess(workload="standin", tmpdir=temp)
    try:
        assert not stale.exists()
        assert not listed.exists()  # the ledger's, the same file
        assert remade.exists()  # its name is listed, but it is another file now
        assert theirs.exists()  # no ledger lists it: not the launcher's to remove
        assert (Path("/dev/shm") / in_use.name).exists()
    finally:
        launcher.stop()
        in_use.close()
        in_use.unlink()
        for path in (theirs, listed, remade):
            path.unlink(missing_ok=True)


def test_an_instance_removes_the_segments_it_made_and_never_a_file_it_only_mapped() -> None:
    """A file in /dev/shm before the instance (a model copied to RAM) that the instance maps is
    not the instance's: DELETE leaves it. The segment the instance made goes."""
    theirs = Path(f"/dev/shm/launcher_test_model_{os.getpid()}")
    theirs.write_bytes(b"w" * 8192)
    made = f"psm_launcher_test_made_{os.getpid()}"
    launcher = LauncherProcess(workload="standin")
    try:
        options = _options(f"--map-file {theirs} --make-segment {made}")
        assert launcher.create("mapper", options=options).status_code == 201
        wait_until(lambda: launcher.state("mapper")["ready"], 10, what="ready")
        time.sleep(1.5)  # a scan of /dev/shm has seen both mapped
        assert launcher.client.delete("/v2/vllm/instances/mapper").status_code == 200
        wait_until(lambda: not Path(f"/dev/shm/{made}").exists(), 10, what="its own segment removed")
        assert theirs.exists() and theirs.read_bytes() == b"w" * 8192
    finally:
        launcher.stop()
        theirs.unlink(missing_ok=True)
        Path(f"/dev/shm/{made}").unlink(missing_ok=True)


def test_reading_a_big_log_does_not_block_other_requests(standin: LauncherProcess) -> None:
    assert standin.create("big", options=_options("--spam-lines 30000")).status_code == 201
    wait_until(lambda: standin.state("big")["ready"], 30, what="big ready")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        reads = [pool.submit(standin.client.get, "/v2/vllm/instances/big/log", headers={"Range": f"bytes={i * 1000}-"})
                 for i in range(16)]  # fmt: skip
        health = [pool.submit(standin.client.get, "/health") for _ in range(16)]
        assert all(f.result().status_code == 206 for f in reads)
        assert all(f.result().status_code == 200 for f in health)
    assert all(len(f.result().content) == 1 << 20 for f in reads)  # 1 MiB cap on each


def test_a_second_launcher_on_the_same_log_directory_refuses_and_deletes_nothing() -> None:
    # `make run PORT=18500`, then `LAUNCHER_PORT=18500 uvicorn launcher.app:app --port 18531`: the
    # second one used to sweep the first one's live logs.
    log_dir = Path(tempfile.mkdtemp(prefix="shared-logs-"))
    first = LauncherProcess(workload="standin", env={"LAUNCHER_LOG_DIR": str(log_dir)})
    try:
        assert first.create("keep", options=_options("--spam-lines 10")).status_code == 201
        wait_until(lambda: first.state("keep")["ready"], 10, what="keep ready")
        before = first.client.get("/v2/vllm/instances/keep/log").content
        assert before
        for command in (
            [sys.executable, "-m", "launcher", "--port", str(free_port())],
            [sys.executable, "-m", "uvicorn", "launcher.app:app", "--port", str(free_port())],
        ):
            second = subprocess.run(
                command, cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
                env={**os.environ, "LAUNCHER_LOG_DIR": str(log_dir), "LAUNCHER_FORKSERVER_WORKLOAD": "standin",
                     "TMPDIR": str(first.tmpdir)},
            )  # fmt: skip
            assert second.returncode != 0
            assert f"the log directory {log_dir} is in use by another launcher (pid {first.process.pid})" in second.stderr
        assert (log_dir / "keep.log").exists()
        assert first.client.get("/v2/vllm/instances/keep/log").content.startswith(before)  # nothing lost
    finally:
        first.stop()
        shutil.rmtree(log_dir, ignore_errors=True)


def test_a_clean_shutdown_leaves_no_empty_log_folders() -> None:
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_LOG_DIR": ""})  # <tmp>/vllm-launcher-<uid>/<port>/logs
    port_dir = launcher.tmpdir / f"vllm-launcher-{os.getuid()}" / str(launcher.port)
    try:
        assert (port_dir / "logs").is_dir()
        assert launcher.create("x", options=_options()).status_code == 201
    finally:
        assert launcher.stop() == []
    assert not port_dir.exists()


def test_after_a_dropped_connection_the_list_matches_the_running_processes() -> None:
    # In-process, so the test can drop the API's connection to an external forkserver (nothing
    # outside the API can); everything else is real: the forkserver, its instances, the reconnect.
    import asyncio

    from launcher.instances.config import VllmConfig
    from launcher.instances.manager import InstanceManager
    from launcher.settings import Settings

    workdir = Path(tempfile.mkdtemp(prefix="fs-drop-"))
    socket_path = str(workdir / "run" / "fs.sock")
    forkserver = start_standalone_forkserver(socket_path)
    settings = Settings(forkserver_socket=socket_path, forkserver_workload="standin", log_dir=str(workdir / "logs"))

    async def scenario() -> None:
        manager = InstanceManager(settings)
        manager.start()
        try:
            await manager.forkserver.client()
            for name in ("stays", "dies"):
                await manager.create(VllmConfig(options=_options()), name, received_at=time.time())
                await manager.wait_settled(name)
            client = manager.forkserver._client  # noqa: SLF001 - the connection this test drops
            assert client is not None
            os.kill(manager.get("dies").pid, signal.SIGKILL)  # exits while the API is not connected
            await client.close()
            await asyncio.sleep(0.5)
            await manager.forkserver.client()  # reconnected
            for _ in range(100):
                if not manager.get("dies").live:
                    break
                await asyncio.sleep(0.05)
            stays, dies = manager.get("stays"), manager.get("dies")
            assert stays.live and process_alive(stays.pid), "a running instance was forgotten"
            assert os.path.exists(stays.log_path)
            assert not dies.live and not process_alive(dies.pid)
            await manager.delete("stays")
        finally:
            await manager.shutdown()

    try:
        asyncio.run(scenario())
    finally:
        forkserver.send_signal(signal.SIGTERM)
        forkserver.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize(
    ("server", "env", "said"),
    [
        # The preload fails with a message (vLLM without a C++ compiler or libnuma fails so).
        ("launcher", {"STANDIN_PRELOAD_FAILS": "no working C++ compiler here"},
         "forkserver: cannot preload standin: no working C++ compiler here"),
        # The forkserver dies with a traceback: its last line is the reason.
        ("launcher", {"LAUNCHER_FORKSERVER_WORKLOAD": "tests.no_such_workload:WORKLOAD"},
         "ModuleNotFoundError: No module named 'tests.no_such_workload'"),
        ("uvicorn", {"STANDIN_PRELOAD_FAILS": "no working C++ compiler here"},
         "forkserver: cannot preload standin: no working C++ compiler here"),
    ],
)  # fmt: skip
def test_a_forkserver_that_never_starts_stops_the_launcher_saying_why(
    server: str, env: dict[str, str], said: str, tmp_path: Path
) -> None:
    """It used to be restarted forever while /health answered 503: now the third failure in a row
    (before any forkserver was ready) stops the launcher, non-zero, with the reason in one line."""
    commands = {"launcher": ["launcher"], "uvicorn": ["uvicorn", "launcher.app:app"]}
    result = subprocess.run(
        [sys.executable, "-m", *commands[server], "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "LAUNCHER_FORKSERVER_WORKLOAD": "standin", "LAUNCHER_LOG_DIR": str(tmp_path / "logs"),
             "LAUNCHER_RUNTIME_DIR": str(tmp_path / "run"), "TMPDIR": str(tmp_path), **env},
    )  # fmt: skip
    assert result.returncode == (2 if server == "launcher" else -signal.SIGTERM), result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "stopping the launcher" in line]
    assert "the forkserver failed to start 3 times in a row" in line and said in line, line
    assert result.stderr.count("failed to start: it exited with code") == 2  # the first two, one line each
