"""ps tells the launcher's processes apart: the forkserver and each instance carry their own title."""

from __future__ import annotations

from pathlib import Path

import psutil

from tests.launcher_process import LauncherProcess, free_port, wait_until


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0")


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_forkserver_and_instances_are_named_in_ps(standin: LauncherProcess) -> None:
    forkserver = standin.forkserver_pid()
    socket_path = standin.runtime_dir / "forkserver.sock"
    assert _cmdline(forkserver) == f"vllm-launcher: forkserver {socket_path}".encode()
    assert _comm(forkserver) == "vllm-forkserver"

    port = free_port()
    response = standin.create("titled", options=f"--model standin-model --port {port} --spawn-helper")
    assert response.status_code == 201, response.text
    pid = standin.state("titled")["pid"]
    assert psutil.Process(pid).ppid() == forkserver  # one of ours, not a stranger's process
    wait_until(lambda: _cmdline(pid) == b"vllm-launcher: instance titled", 10, what="the instance's title")
    assert _comm(pid) == "vllm-instance"
    # A process the instance forks starts under its title (vLLM's EngineCore then sets its own).
    helper = wait_until(lambda: psutil.Process(pid).children(), 10, what="the instance's helper")[0]
    assert _cmdline(helper.pid) == b"vllm-launcher: instance titled"
    assert _cmdline(forkserver) == f"vllm-launcher: forkserver {socket_path}".encode()  # unchanged by forks
    # The API process too, beside its forkserver.
    assert _cmdline(standin.process.pid) == f"vllm-launcher: api :{standin.port}".encode()
    assert _comm(standin.process.pid) == "vllm-launcher"
