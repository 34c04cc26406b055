"""Where llm-d FMA's own launcher answers differently, FMA's entry (``/app/launcher.py``) answers as
FMA's does, because FMA's dual-pods controller branches on it; ``python -m launcher`` keeps its
own answers (docs/fma.md lists each difference and why).

FMA's behaviour is read from its ``inference_server/launcher/launcher.py`` at commit 553c7b7.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.launcher_process import REPO, LauncherProcess, free_port, start_standalone_forkserver, wait_until

FMA_ENTRY = [sys.executable, str(REPO / "deploy" / "fma" / "app" / "launcher.py")]
INSTANCES = "/v2/vllm/instances"


@pytest.fixture(scope="module")
def fma() -> Iterator[LauncherProcess]:
    """The launcher as FMA's pods start it: ``python3 /app/launcher.py --mock-gpus ...``."""
    process = LauncherProcess(server=FMA_ENTRY, env={"LAUNCHER_MOCK_GPUS": "1", "LAUNCHER_STOP_TIMEOUT": "2"})
    yield process
    assert not process.stop()


@pytest.fixture(scope="module")
def own() -> Iterator[LauncherProcess]:
    process = LauncherProcess(env={"LAUNCHER_STOP_TIMEOUT": "2"})
    yield process
    assert not process.stop()


def _stopped(launcher: LauncherProcess, instance_id: str) -> dict[str, Any]:
    return dict(wait_until(lambda: _state_if_stopped(launcher, instance_id), 20, what=f"{instance_id} stopped"))


def _state_if_stopped(launcher: LauncherProcess, instance_id: str) -> dict[str, Any] | None:
    state = launcher.state(instance_id)
    return state if state["status"] == "stopped" else None


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ("--model standin-model --no-such-flag", "--no-such-flag"),  # the parser rejects it
        ("--port 8000", "model"),  # no model at all
        ("", "model"),  # FMA's launcher takes an empty options string too
    ],
)
def test_options_that_cannot_start_give_a_stopped_instance_under_fmas_entry(
    fma: LauncherProcess, own: LauncherProcess, options: str, words: str
) -> None:
    """FMA's controller treats a create error as retryable and a stopped instance as final (it deletes
    the requester pod, so the user sees it): under FMA's entry the create is a 201, then the instance stops."""
    created = fma.create("cannot-start", options=options)
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "started" and created.json()["options"] == options
    state = _stopped(fma, "cannot-start")
    assert state["exit_code"] == 2  # argparse's code, as `vllm serve` with such options
    assert words in state["stop_reason"]
    assert words in fma.client.get(f"{INSTANCES}/cannot-start/log").text
    assert fma.client.delete(f"{INSTANCES}/cannot-start").status_code == 200
    # The launcher's own entry still refuses them before forking anything.
    refused = own.create("cannot-start", options=options)
    assert refused.status_code in (400, 422)
    assert words in refused.json()["detail"] or "options" in refused.json()["detail"]
    assert own.client.get(f"{INSTANCES}/cannot-start").status_code == 404


@pytest.mark.parametrize(("launcher_name", "maybe"), [("fma", 422), ("own", 400)])
def test_detail_takes_pydantics_words(request: pytest.FixtureRequest, launcher_name: str, maybe: int) -> None:
    launcher: LauncherProcess = request.getfixturevalue(launcher_name)
    for word in ("on", "t", "Y", "yes", "1", "True"):
        assert "instances" in launcher.client.get(INSTANCES, params={"detail": word}).json()
    for word in ("off", "f", "N", "no", "0", "False"):
        assert "instance_ids" in launcher.client.get(INSTANCES, params={"detail": word}).json()
    assert launcher.client.get(INSTANCES, params={"detail": "maybe"}).status_code == maybe


def _empty_log_instance(launcher: LauncherProcess, instance_id: str) -> None:
    assert launcher.create(instance_id, options="--model standin-model").status_code == 201
    wait_until(lambda: launcher.state(instance_id)["ready"], 20, what="ready")
    (launcher.log_dir / f"{instance_id}.log").write_bytes(b"")  # the test's own log directory


def test_an_empty_log_is_416_under_fmas_entry_and_200_under_ours(fma: LauncherProcess, own: LauncherProcess) -> None:
    _empty_log_instance(fma, "quiet")
    answer = fma.client.get(f"{INSTANCES}/quiet/log")
    assert answer.status_code == 416 and answer.headers["content-range"] == "bytes */0" and answer.content == b""
    _empty_log_instance(own, "quiet")
    answer = own.client.get(f"{INSTANCES}/quiet/log")
    assert answer.status_code == 200 and answer.content == b"" and "content-range" not in answer.headers
    for launcher in (fma, own):
        assert launcher.client.delete(f"{INSTANCES}/quiet").status_code == 200


def test_a_200_log_says_where_its_bytes_sit_and_an_explicit_range_is_not_cut_at_1_mib(own: LauncherProcess) -> None:
    assert own.create("big-log", options="--model standin-model").status_code == 201
    wait_until(lambda: own.state("big-log")["ready"], 20, what="ready")
    path = own.log_dir / "big-log.log"
    with path.open("ab") as log:
        log.write(b"x" * (3 << 20))  # the instance's log grows past 3 MiB
    total = path.stat().st_size
    whole = own.client.get(f"{INSTANCES}/big-log/log")
    assert whole.status_code == 200 and len(whole.content) == 1 << 20
    assert whole.headers["content-range"] == f"bytes 0-{(1 << 20) - 1}/{total}"
    ranged = own.client.get(f"{INSTANCES}/big-log/log", headers={"Range": f"bytes=0-{(2 << 20) - 1}"})
    assert ranged.status_code == 206 and len(ranged.content) == 2 << 20  # the document: what was asked for
    assert ranged.headers["content-range"] == f"bytes 0-{(2 << 20) - 1}/{total}"
    open_ended = own.client.get(f"{INSTANCES}/big-log/log", headers={"Range": "bytes=0-"})
    assert open_ended.status_code == 206 and len(open_ended.content) == 1 << 20  # START-: up to 1 MB
    assert own.client.delete(f"{INSTANCES}/big-log").status_code == 200


def test_a_watch_from_a_future_revision_waits_for_it_under_fmas_entry(fma: LauncherProcess, own: LauncherProcess) -> None:
    future = own.client.get(INSTANCES).json()["revision"] + 5
    refused = own.client.get(f"{INSTANCES}/watch", params={"since": future})
    assert refused.status_code == 400 and "future" in refused.json()["detail"]

    since = fma.client.get(INSTANCES).json()["revision"] + 1  # the next event's revision: not sent
    lines: list[dict[str, Any]] = []
    headers: dict[str, str] = {}

    def read() -> None:
        with httpx.stream("GET", f"{fma.base_url}{INSTANCES}/watch", params={"since": since}, timeout=30) as answer:
            headers.update(answer.headers)
            for line in answer.iter_lines():
                lines.append(json.loads(line))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_until(lambda: headers, 10, what="the watch's headers")
    assert headers["x-content-type-options"] == "nosniff" and headers["content-type"] == "application/x-ndjson"
    assert fma.create("w", options="--model standin-model").status_code == 201  # revision `since`
    assert fma.client.delete(f"{INSTANCES}/w").status_code == 200  # later revisions
    reader.join(20)
    assert lines and lines[0]["object"]["revision"] > since


def test_options_are_split_at_whitespace_under_fmas_entry(fma: LauncherProcess, own: LauncherProcess) -> None:
    """FMA's launcher splits options with str.split(): quotes stay (a JSON value reaches vLLM as
    written); ours splits them as a shell would."""
    options = "--model standin-model --served-model-name bob's-model"
    created = fma.create("quoted", options=options)
    assert created.status_code == 201, created.text
    wait_until(lambda: fma.state("quoted")["ready"], 20, what="ready")
    assert fma.client.delete(f"{INSTANCES}/quoted").status_code == 200
    refused = own.create("quoted", options=options)
    assert refused.status_code == 400 and "cannot be split" in refused.json()["detail"]


def test_a_busy_port_gives_a_stopped_instance_under_fmas_entry(fma: LauncherProcess, own: LauncherProcess) -> None:
    for launcher in (fma, own):
        assert launcher.create("first", options="--model standin-model").status_code == 201
        wait_until(lambda launcher=launcher: launcher.state("first")["ready"], 20, what="ready")
    port = fma.state("first")["port"]
    created = fma.create("second", options=f"--model standin-model --port {port}")
    assert created.status_code == 201, created.text
    stopped = _stopped(fma, "second")  # it cannot bind: FMA's flow, a stopped instance saying why
    assert stopped["exit_code"] == 2 and f"port {port}" in stopped["stop_reason"]
    assert not stopped["ready"]  # never taken for ready on the other instance's /health
    assert fma.create("third", options="--model standin-model --port 70000").status_code == 201
    assert "70000" in _stopped(fma, "third")["stop_reason"]
    refused = own.create("second", options=f"--model standin-model --port {own.state('first')['port']}")
    assert refused.status_code == 409 and "already used" in refused.json()["detail"]
    for launcher in (fma, own):
        launcher.client.delete(INSTANCES)


def test_fmas_entry_lifts_the_instance_and_body_limits_unless_told() -> None:
    from launcher.fma.compat import fma_defaults

    assert fma_defaults([], {}) == ["--fma-compat", "--max-instances", "0", "--max-body-bytes", str(1 << 20)]
    assert fma_defaults(["--max-instances=4", "--no-fma-compat"], {"LAUNCHER_MAX_BODY_BYTES": "100"}) == []


def test_the_instance_list_is_503_until_instances_can_be_created_under_fmas_entry(tmp_path: Path) -> None:
    """FMA's pods probe GET /v2/vllm/instances for readiness; FMA's launcher opens its port only once
    it can fork. A preload made slow on purpose shows the window."""
    (tmp_path / "slow_preload.py").write_text("import time\ntime.sleep(4)\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}", "LAUNCHER_FORKSERVER_WORKLOAD": "standin",
           "LAUNCHER_FORKSERVER_PRELOAD": "slow_preload", "LAUNCHER_LOG_DIR": str(tmp_path / "logs"),
           "LAUNCHER_RUNTIME_DIR": str(tmp_path / "run"), "TMPDIR": str(tmp_path)}  # fmt: skip
    process = subprocess.Popen([*FMA_ENTRY, "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}{INSTANCES}"
        early = wait_until(lambda: _answer(url), 30, what="the launcher's port")
        assert early.status_code == 503  # the forkserver is still preloading
        wait_until(lambda: (answer := _answer(url)) is not None and answer.status_code == 200, 60, what="ready")
    finally:
        process.terminate()
        process.wait(30)


def _answer(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None


@pytest.mark.parametrize("size", [700_000, 2_000_000])
def test_options_too_large_for_the_forkserver_are_a_400_not_a_500(fma: LauncherProcess, size: int) -> None:
    """Options of 0.5-1 MiB pass a validate but not a spawn (argv and meta carry them twice): a 400
    that says so (a 413 beyond the 1 MiB body cap of FMA's entry), never a 500."""
    options = "--model standin-model " + "--x " * (size // 4)
    answer = fma.create("big", options=options)
    assert answer.status_code in (400, 413), answer.text[:300]
    assert fma.client.get(f"{INSTANCES}/big").status_code == 404


def test_a_busy_port_is_never_ready_on_the_other_instances_health(fma: LauncherProcess) -> None:
    """Under FMA's entry a --port another instance holds gives a stopped instance, never one taken for
    ready on the other's /health."""
    port = free_port()
    fma.client.delete(INSTANCES)
    assert fma.create("first", options=f"--model standin-model --port {port}").status_code == 201
    wait_until(lambda: fma.state("first")["ready"], 20, what="first ready")
    watch_from = fma.client.get("/v2/vllm/instances").json()["revision"]
    assert fma.create("second", options=f"--model standin-model --port {port}").status_code == 201
    wait_until(lambda: fma.state("second")["status"] == "stopped", 20, what="second stopped")
    events = []
    with httpx.stream("GET", f"{fma.base_url}/v2/vllm/instances/watch?since={watch_from}", timeout=5) as stream:
        for line in stream.iter_lines():
            events.append(line)
            if '"STOPPED"' in line:
                break
    second = fma.state("second")
    assert not second["ready"] and second["ready_at"] is None, (second, events)


def _without_privileged_ports() -> tuple[list[str], int]:
    """A command prefix under which the launcher may not bind ports below 1024 (a non-root pod), and
    such a port."""
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if start < 2:
        pytest.skip("every port can be bound by any user on this host")
    if os.geteuid() != 0:
        return [], start - 1
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root without setpriv (util-linux): cannot drop CAP_NET_BIND_SERVICE")
    return [setpriv, "--bounding-set", "-net_bind_service", "--inh-caps", "-net_bind_service"], start - 1


def test_a_port_the_launchers_user_may_not_bind_is_refused_or_a_stopped_instance_never_a_500() -> None:
    prefix, port = _without_privileged_ports()
    for command, fma_entry in (([sys.executable, "-m", "launcher"], False), (FMA_ENTRY, True)):
        launcher = LauncherProcess(server=[*prefix, *command], env={"LAUNCHER_STOP_TIMEOUT": "2"})
        try:
            answer = launcher.create("low", options=f"--model standin-model --port {port}")
            if fma_entry:
                assert answer.status_code == 201, answer.text
                reason = _stopped(launcher, "low")["stop_reason"]
            else:
                assert answer.status_code == 400, answer.text
                reason = answer.json()["detail"]
            assert f"port {port}" in reason and "permission denied" in reason, reason
        finally:
            assert not launcher.stop()


def test_an_instance_made_of_empty_options_is_adopted_after_an_api_restart(tmp_path: Path) -> None:
    """FMA's entry takes ``options: ""``; a standalone forkserver keeps that instance over an API
    restart, and the next API must know it (listed, deletable), not leave a name nobody can use."""
    socket_path = str(tmp_path / "run" / "fs.sock")
    forkserver = start_standalone_forkserver(socket_path)
    env = {"LAUNCHER_FORKSERVER_SOCKET": socket_path, "LAUNCHER_LOG_DIR": str(tmp_path / "logs")}
    try:
        first = LauncherProcess(server=FMA_ENTRY, env=env)
        try:
            assert first.create("empty", options="").status_code == 201
            _stopped(first, "empty")
        finally:
            first.stop()
        second = LauncherProcess(server=FMA_ENTRY, env=env)
        try:
            adopted = second.state("empty")
            assert adopted["options"] == "" and adopted["status"] == "stopped" and adopted["exit_code"] == 2
            assert second.client.delete(f"{INSTANCES}/empty").status_code == 200
            assert not (tmp_path / "logs" / "empty.log").exists()
        finally:
            second.stop()
    finally:
        forkserver.terminate()
        forkserver.wait(30)


def test_unstartable_options_of_a_startable_size_are_a_stopped_instance_too(fma: LauncherProcess) -> None:
    """The parser's message repeats the options: the reason the spawn carries is cut, so that options
    which fit a startable create fit an unstartable one."""
    name = "x" * 400_000
    for instance_id, options in (("fits", f"--model standin-model --served-model-name {name}"),
                                 ("bogus", f"--model standin-model --bogus {name}")):  # fmt: skip
        answer = fma.create(instance_id, options=options)
        assert answer.status_code == 201, answer.text[:300]
    reason = _stopped(fma, "bogus")["stop_reason"]
    assert "--bogus" in reason and len(reason) < 4096
    assert fma.client.delete(INSTANCES).status_code == 200
