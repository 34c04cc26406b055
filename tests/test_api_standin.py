"""The whole API on a real launcher, real forkserver and real forked processes (stand-in workload)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import time

import httpx
import psutil
import pytest

from tests.launcher_process import LauncherProcess, free_port, process_alive, wait_until


def _standin_options(port: int | None = None, extra: str = "") -> str:
    return f"--model standin-model --port {port or free_port()} {extra}".strip()


def _wait_stopped(launcher: LauncherProcess, instance_id: str, timeout: float = 20) -> dict:
    return wait_until(
        lambda: (state := launcher.state(instance_id))["status"] == "stopped" and state,
        timeout,
        what=f"{instance_id} to stop",
    )


def _wait_serving(port: int) -> None:
    def serving() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(serving, 20, what=f"instance on port {port}")


def test_index_lists_every_endpoint(standin: LauncherProcess) -> None:
    body = standin.client.get("/").json()
    assert body["name"] == "Multi-Instance vLLM Management API"
    assert body["version"] == "2.0"
    assert set(body["endpoints"]) >= {
        "index", "health", "create_instance", "create_named_instance", "delete_instance",
        "delete_all_instances", "get_instance_status", "get_all_instances", "get_instance_logs",
    }  # fmt: skip


def test_health(standin: LauncherProcess) -> None:
    response = standin.client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "OK"}


def test_create_get_list_delete_round_trip(standin: LauncherProcess) -> None:
    port = free_port()
    response = standin.create(options=_standin_options(port), env_vars={"A": "1"}, annotations={"team": "x"})
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"] == "started"
    instance_id = created["instance_id"]
    assert re.fullmatch(r"[0-9a-f-]{36}", instance_id)
    assert created["port"] == port

    state = standin.state(instance_id)
    assert state["status"] == "running"
    assert state["options"] == _standin_options(port)
    assert state["env_vars"] == {"A": "1"}
    assert state["annotations"] == {"team": "x"}
    assert state["model"] == "standin-model"
    assert psutil.pid_exists(state["pid"])
    _wait_serving(port)

    ids = standin.client.get("/v2/vllm/instances", params={"detail": "False"}).json()
    assert ids["instance_ids"] == [instance_id] and ids["count"] == 1 and ids["revision"] >= 1
    listing = standin.client.get("/v2/vllm/instances").json()
    assert listing["total_instances"] == 1 and listing["running_instances"] == 1
    assert listing["instances"][0]["instance_id"] == instance_id

    deleted = standin.client.delete(f"/v2/vllm/instances/{instance_id}")
    assert deleted.status_code == 200
    assert deleted.json()["status"] == "terminated" and deleted.json()["instance_id"] == instance_id
    assert not process_alive(state["pid"])
    assert standin.client.get(f"/v2/vllm/instances/{instance_id}").status_code == 404
    assert not (standin.log_dir / f"{instance_id}.log").exists()


def test_put_with_existing_id_is_409(standin: LauncherProcess) -> None:
    assert standin.create("dup", options=_standin_options()).status_code == 201
    second = standin.create("dup", options=_standin_options())
    assert second.status_code == 409
    assert "dup" in second.json()["detail"]


def test_concurrent_puts_of_one_id_give_exactly_one_201(standin: LauncherProcess) -> None:
    def put(_: int) -> int:
        return standin.create("race", options=_standin_options()).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(put, range(8)))
    assert codes == [201] + [409] * 7


def test_delete_unknown_is_404(standin: LauncherProcess) -> None:
    response = standin.client.delete("/v2/vllm/instances/nope")
    assert response.status_code == 404
    assert "nope" in response.json()["detail"]
    assert standin.client.get("/v2/vllm/instances/nope").status_code == 404
    assert standin.client.get("/v2/vllm/instances/nope/log").status_code == 404


def test_delete_all(standin: LauncherProcess) -> None:
    for name in ("one", "two", "three"):
        assert standin.create(name, options=_standin_options()).status_code == 201
    response = standin.client.delete("/v2/vllm/instances")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "all_stopped"
    assert body["total_stopped"] == 3
    assert sorted(item["instance_id"] for item in body["stopped_instances"]) == ["one", "three", "two"]
    assert all(item["status"] == "terminated" for item in body["stopped_instances"])
    assert standin.client.get("/v2/vllm/instances").json()["total_instances"] == 0


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "empty"),
        (b"[1, 2]", 422, "JSON object"),
        (b"{}", 422, "options"),
        (b'{"options": 5}', 422, "options"),
        (b'{"options": "--model m --port 1", "env_vars": {"A": 1}}', 422, "env_vars.A"),
        (b'{"options": "--model m --port 1", "env_vars": ["A"]}', 422, "env_vars"),
        (b'{"options": "--model \'unclosed --port 1"}', 400, "quotation"),
        (b'{"options": "--port 8000"}', 400, "model"),
        (b'{"options": "--model m --port 1 --no-such-flag"}', 400, "unrecognized arguments: --no-such-flag"),
        (b'{"options": "--model m --port notaport"}', 400, "--port"),
        # Found by the fuzz suite (tests/test_hostile_input.py): each was a 500 or a doomed 201.
        (b'{"options": "--model m --port 70000"}', 400, "1-65535"),
        (b'{"options": "--model m --port 0"}', 400, "1-65535"),
        (b'{"options": "--model m", "env_vars": {"A=B": "1"}}', 422, "environment variable name"),
        (b'{"options": "--model m", "env_vars": {"": "1"}}', 422, "environment variable name"),
        (b'{"options": "--model m", "env_vars": {"A": "a\\u0000b"}}', 422, "NUL"),
        (b'{"options": "--model m", "annotations": {"k": "\\ud800"}}', 422, "surrogate"),
        (b'{"options": "--model m", "gpu_uuids": ["\\udfff"]}', 422, "surrogate"),
    ],
)
def test_bad_create_bodies_get_a_clear_4xx_and_create_nothing(
    standin: LauncherProcess, body: bytes, status: int, words: str
) -> None:
    response = standin.client.post("/v2/vllm/instances", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert standin.client.get("/v2/vllm/instances").json()["total_instances"] == 0
    assert not list(standin.log_dir.glob("*.log"))


@pytest.mark.parametrize("instance_id", ["-x", ".hidden", "a" * 129, "a b", "ünï", "a%2Fb", "..", "a;b"])
def test_invalid_instance_ids_are_rejected(standin: LauncherProcess, instance_id: str) -> None:
    response = standin.create(instance_id, options=_standin_options())
    assert response.status_code in (400, 404), response.text
    assert "detail" in response.json()
    assert standin.client.get("/v2/vllm/instances").json()["total_instances"] == 0


def test_wrong_content_type_is_415_and_huge_body_is_413(standin: LauncherProcess) -> None:
    response = standin.client.post("/v2/vllm/instances", content=b"options=x", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    huge = b'{"options": "' + b"x" * 100_000 + b'"}'
    response = standin.client.post("/v2/vllm/instances", content=huge, headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_detail_parameter(standin: LauncherProcess) -> None:
    assert "instances" in standin.client.get("/v2/vllm/instances", params={"detail": "True"}).json()
    assert "instance_ids" in standin.client.get("/v2/vllm/instances", params={"detail": "false"}).json()
    assert standin.client.get("/v2/vllm/instances", params={"detail": "maybe"}).status_code == 400


def test_unknown_paths_answer_json_404(standin: LauncherProcess) -> None:
    response = standin.client.put("/v2/vllm/instances/..%2F..%2Fetc", json={"options": "--model m --port 1"})
    assert response.status_code == 404
    assert "detail" in response.json()


def test_crash_is_reported_with_exit_code_and_log_stays_readable(standin: LauncherProcess) -> None:
    options = _standin_options(extra="--crash-after 0.2 --exit-code 7")
    assert standin.create("crasher", options=options).status_code == 201
    state = _wait_stopped(standin, "crasher")
    assert state["exit_code"] == 7
    assert "stopped_at" in state
    log = standin.client.get("/v2/vllm/instances/crasher/log")
    assert b"standin crashing with code 7" in log.content
    assert standin.client.get("/v2/vllm/instances").json()["running_instances"] == 0
    assert standin.client.delete("/v2/vllm/instances/crasher").status_code == 200


def test_killed_instance_reports_negative_signal(standin: LauncherProcess) -> None:
    assert standin.create("victim", options=_standin_options()).status_code == 201
    os.kill(standin.state("victim")["pid"], signal.SIGKILL)
    assert _wait_stopped(standin, "victim")["exit_code"] == -signal.SIGKILL


def test_instance_ignoring_sigterm_is_killed_at_the_deadline_with_its_group(standin: LauncherProcess) -> None:
    assert standin.create("stubborn", options=_standin_options(extra="--ignore-sigterm --spawn-helper")).status_code == 201
    pid = standin.state("stubborn")["pid"]
    wait_until(lambda: len(psutil.Process(pid).children()) == 1, 10, what="the helper")
    group = [pid] + [child.pid for child in psutil.Process(pid).children()]
    started = time.monotonic()
    assert standin.client.delete("/v2/vllm/instances/stubborn").status_code == 200
    assert time.monotonic() - started >= 1.5  # waited for the 2 s deadline before SIGKILL
    assert not [p for p in group if process_alive(p)]


def test_helper_processes_go_with_their_instance(standin: LauncherProcess) -> None:
    assert standin.create("parent", options=_standin_options(extra="--spawn-helper")).status_code == 201
    pid = standin.state("parent")["pid"]
    helper = wait_until(lambda: psutil.Process(pid).children(), 10, what="the helper")[0]
    assert os.getpgid(helper.pid) == pid  # same process group, own session
    os.kill(pid, signal.SIGKILL)
    _wait_stopped(standin, "parent")
    assert not psutil.pid_exists(helper.pid)


def test_env_vars_reach_the_instance(standin: LauncherProcess) -> None:
    response = standin.create("env", options=_standin_options(extra="--print-env GREETING --print-env HOME"),
                              env_vars={"GREETING": "hello world"})  # fmt: skip
    assert response.status_code == 201
    text = wait_until(lambda: (log := standin.client.get("/v2/vllm/instances/env/log").text) and "HOME" in log and log,
                      10, what="the env lines")  # fmt: skip
    assert "ENV GREETING=hello world" in text
    assert f"ENV HOME={os.environ.get('HOME', '<unset>')}" in text  # the launcher's own environment is kept


def test_instance_inherits_no_launcher_fds(standin: LauncherProcess) -> None:
    assert standin.create("fds", options=_standin_options()).status_code == 201
    pid = standin.state("fds")["pid"]
    _wait_serving(standin.state("fds")["port"])

    def fd_targets(process_id: int) -> dict[int, str]:
        targets = {}
        for fd in os.listdir(f"/proc/{process_id}/fd"):
            with contextlib.suppress(FileNotFoundError):  # a probe's socket, closed meanwhile
                targets[int(fd)] = os.readlink(f"/proc/{process_id}/fd/{fd}")
        return targets

    fds = fd_targets(pid)
    assert fds[0] == "/dev/null"
    assert fds[1] == fds[2] == str(standin.log_dir / "fds.log")
    inherited = {target for fd, target in fds.items() if fd > 2}
    # Only its own sockets (its listener, perhaps a probe's connection): nothing of the forkserver
    # (listener, clients, wakeup pair, epoll) or of the launcher.
    assert all(target.startswith("socket:") for target in inherited), inherited
    for parent in (standin.forkserver_pid(), standin.process.pid):
        assert not inherited & set(fd_targets(parent).values())


def test_stdout_and_stderr_flood_loses_and_splits_no_line(standin: LauncherProcess) -> None:
    lines = 20_000
    assert standin.create("flood", options=_standin_options(extra=f"--spam-lines {lines}")).status_code == 201
    _wait_serving(standin.state("flood")["port"])
    content = b""
    while True:  # follow the log by Range, 1 MiB at a time, as a client would
        response = standin.client.get("/v2/vllm/instances/flood/log", headers={"Range": f"bytes={len(content)}-"})
        if response.status_code == 416:
            break
        assert response.status_code == 206
        content += response.content
    seen: dict[str, list[int]] = {"OUT": [], "ERR": []}
    for line in content.decode().splitlines():
        if line.startswith(("OUT ", "ERR ")):
            tag, number, payload = line.split(" ")
            assert payload == "x" * 64, line
            seen[tag].append(int(number))
    assert seen["OUT"] == list(range(lines))
    assert seen["ERR"] == list(range(lines))


def test_log_range_rules(standin: LauncherProcess) -> None:
    assert standin.create("logs", options=_standin_options()).status_code == 201
    _wait_serving(standin.state("logs")["port"])
    url = "/v2/vllm/instances/logs/log"
    full = standin.client.get(url)
    assert full.status_code == 200
    assert full.headers["content-type"] == "application/octet-stream"
    total = len(full.content)
    assert total > 10

    part = standin.client.get(url, headers={"Range": "bytes=2-5"})
    assert part.status_code == 206
    assert part.content == full.content[2:6]
    assert part.headers["content-range"] == f"bytes 2-5/{total}"

    tail = standin.client.get(url, headers={"Range": "bytes=3-"})
    assert tail.content == full.content[3:]
    assert tail.headers["content-range"] == f"bytes 3-{total - 1}/{total}"

    beyond = standin.client.get(url, headers={"Range": f"bytes=0-{total + 100}"})
    assert beyond.status_code == 206 and beyond.content == full.content

    unsatisfiable = standin.client.get(url, headers={"Range": f"bytes={total}-"})
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["content-range"] == f"bytes */{total}"
    assert unsatisfiable.content == b""

    for bad in ("bytes=-5", "bytes=5-2", "bytes=a-b", "items=0-1", "bytes=0-1,3-4", "bytes=", "bytes=0-" + "9" * 4400):
        response = standin.client.get(url, headers={"Range": bad})
        assert response.status_code == 400, bad
        assert "Range" in response.json()["detail"]


def test_create_while_deleting_all(standin: LauncherProcess) -> None:
    """A create racing a DELETE of every instance: made (and deleted if the DELETE saw it under way),
    or taken back before its fork (409); never an instance that runs unlisted. The launcher picks the
    ports: two of the test's free_port() calls can return one port on a busy machine."""
    for index in range(3):
        assert standin.create(f"old-{index}", options="--model standin-model").status_code == 201
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        deleting = pool.submit(standin.client.delete, "/v2/vllm/instances")
        created = [pool.submit(standin.create, f"new-{index}", options="--model standin-model") for index in range(3)]
        assert deleting.result().status_code == 200
        answers = [future.result() for future in created]
    for answer in answers:
        assert answer.status_code == 201 or (answer.status_code == 409 and "before it was forked" in answer.text), (
            answer.text
        )
    remaining = standin.client.get("/v2/vllm/instances", params={"detail": "False"}).json()["instance_ids"]
    assert not [name for name in remaining if name.startswith("old-")]
    forkserver = psutil.Process(standin.forkserver_pid())
    assert len(forkserver.children()) == len(remaining), (remaining, forkserver.children())


def test_delete_right_after_create_is_honoured_by_sigterm() -> None:
    """A SIGTERM sent before the child has set itself up must not be lost (regression)."""
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_STOP_TIMEOUT": "60"})
    try:
        for index in range(10):
            assert launcher.create(f"quick-{index}", options=_standin_options()).status_code == 201
            started = time.monotonic()
            assert launcher.client.delete(f"/v2/vllm/instances/quick-{index}").status_code == 200
            # Far below the 60 s SIGKILL deadline: the SIGTERM itself ended the instance.
            assert time.monotonic() - started < 30
    finally:
        assert not launcher.stop()


@pytest.mark.parametrize("since", ["\u00b2", "1" * 5000, "-1", "1.5"])
def test_odd_since_values_are_400(standin: LauncherProcess, since: str) -> None:
    response = standin.client.get("/v2/vllm/instances/watch", params={"since": since})
    assert response.status_code == 400
    assert len(response.json()["detail"]) < 200  # never echoes a huge value back


def test_no_trailing_slash_redirect(standin: LauncherProcess) -> None:
    # A 307 to /v2/vllm/instances would turn this into a delete-all for redirect-following clients.
    assert standin.create("survivor", options=_standin_options()).status_code == 201
    response = standin.client.delete("/v2/vllm/instances/")
    assert response.status_code == 404
    assert standin.client.get("/v2/vllm/instances/survivor").status_code == 200
