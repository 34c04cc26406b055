"""The Python client (launcher.client) and ``launcherctl`` (launcher.client.cli) against a real launcher.

One launcher (stand-in workload, mock GPUs) for the module; every test deletes its instances.
The CLI runs as a real subprocess, so its exit codes and streams are what a script sees.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from launcher.client.api_client import (
    ConflictError,
    InstanceStoppedError,
    LauncherAPIError,
    LauncherClient,
    LauncherConnectionError,
    NotFoundError,
    UnauthorizedError,
    WaitTimeoutError,
    WatchEvent,
)
from launcher.client.cli import format_age, format_table, instance_url
from tests.launcher_process import REPO, LauncherProcess, free_port, wait_until

MODEL = "--model standin-model"
# The stand-in exits (code 3) before it ever serves, so it can never become ready.
FAILS_AT_START = f"{MODEL} --fail-at-start"


@pytest.fixture(scope="module")
def launcher() -> Iterator[LauncherProcess]:
    process = LauncherProcess(workload="standin", env={"LAUNCHER_MOCK_GPUS": "1", "LAUNCHER_STOP_TIMEOUT": "2"})
    yield process
    leftovers = process.stop()
    assert not leftovers, f"processes outlived the launcher: {leftovers}"


@pytest.fixture(autouse=True)
def _delete_instances(launcher: LauncherProcess) -> Iterator[None]:
    yield
    if launcher.process.poll() is None:
        assert launcher.client.delete("/v2/vllm/instances").status_code == 200


@pytest.fixture
def client(launcher: LauncherProcess) -> Iterator[LauncherClient]:
    with LauncherClient(launcher.base_url) as api:
        yield api


def run_cli(
    launcher: LauncherProcess | None, *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``launcherctl --url <launcher> args...`` as a subprocess (no ``LAUNCHER_*`` but those in ``env``)."""
    url = ["--url", launcher.base_url] if launcher is not None else []
    env = {key: value for key, value in os.environ.items() if not key.startswith("LAUNCHER_")} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "launcher.client.cli", *url, *args],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _lines(log: bytes, tag: str) -> list[str]:
    return [line for line in log.decode().splitlines() if line.startswith(tag + " ")]


def _assert_spam(log: bytes, count: int) -> None:
    """Every spammed line present, whole, in order, for both streams."""
    for tag in ("OUT", "ERR"):
        lines = _lines(log, tag)
        assert lines == [f"{tag} {number:08d} {'x' * 64}" for number in range(count)], tag


# ---------------------------------------------------------------------------------- imports


def test_importing_client_and_cli_pulls_in_no_torch_or_vllm() -> None:
    code = (
        "import sys, launcher.client, launcher.client.cli; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'vllm', 'transformers', 'numpy', 'starlette', 'pydantic', 'uvicorn')); "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------- client


def test_info_health_and_gpus(client: LauncherClient) -> None:
    info = client.info()
    assert info["version"] and "watch_instances" in info["endpoints"]
    assert client.health() == {"status": "OK"}
    gpus = client.gpus()
    assert gpus["mock"] is True and gpus["count"] == len(gpus["gpus"]) > 0
    assert gpus["gpus"][0]["uuid"] == "GPU-0"


def test_token_is_sent_as_bearer_and_url_gets_a_scheme() -> None:
    with LauncherClient("localhost:9/", token="s3cret") as api:
        assert api.base_url == "http://localhost:9"
        assert api._http.headers["Authorization"] == "Bearer s3cret"
    with LauncherClient() as api:
        assert "Authorization" not in api._http.headers


def test_token_against_a_launcher_that_requires_one() -> None:
    secured = LauncherProcess(workload="standin", env={"LAUNCHER_API_TOKEN": "t0k"})
    try:
        with LauncherClient(secured.base_url) as anonymous, pytest.raises(UnauthorizedError) as refused:
            anonymous.list()
        assert refused.value.status_code == 401 and "bearer token" in refused.value.detail
        with LauncherClient(secured.base_url, token="t0k") as api:
            assert api.create(MODEL, instance_id="tok")["instance_id"] == "tok"
            with api.watch(read_timeout=30) as events:
                assert next(events)["object"]["instance_id"] == "tok"
        assert run_cli(secured, "list").returncode == 1
        assert "--token" in run_cli(secured, "list").stderr
        assert "tok" in run_cli(secured, "--token", "t0k", "list").stdout
        from_env = run_cli(secured, "delete", "--all", env={"LAUNCHER_API_TOKEN": "t0k"})
        assert from_env.returncode == 0 and from_env.stdout == "deleted 1 instance(s): tok\n"
    finally:
        leftovers = secured.stop()
    assert not leftovers


def test_create_get_list_delete(client: LauncherClient) -> None:
    generated = client.create(MODEL)
    assert generated["status"] == "started" and re.fullmatch(r"[0-9a-f-]{36}", generated["instance_id"])
    named = client.create(
        MODEL, instance_id="named", env_vars={"A": "1"}, gpu_uuids=["GPU-1"], annotations={"team": "x"}
    )
    assert named["instance_id"] == "named" and named["model"] == "standin-model"
    state = client.get("named")
    assert state["status"] == "running" and state["pid"] == named["pid"] and state["port"] == named["port"]
    assert state["env_vars"] == {"A": "1", "CUDA_VISIBLE_DEVICES": "1"} and state["gpu_uuids"] == ["GPU-1"] and state["annotations"] == {"team": "x"}
    assert client.gpus()["gpus"][1]["instances"] == ["named"]

    listed = client.list()
    assert listed["total_instances"] == 2 and listed["running_instances"] == 2
    assert {item["instance_id"] for item in listed["instances"]} == {"named", generated["instance_id"]}
    assert sorted(client.list(detail=False)["instance_ids"]) == sorted(["named", generated["instance_id"]])

    deleted = client.delete("named")
    assert deleted["status"] == "terminated" and deleted["instance_id"] == "named"
    with pytest.raises(NotFoundError):
        client.get("named")
    answer = client.delete_all()
    assert answer["total_stopped"] == 1 and answer["stopped_instances"][0]["instance_id"] == generated["instance_id"]
    assert client.list(detail=False)["count"] == 0


def test_errors_map_to_exception_classes(client: LauncherClient, launcher: LauncherProcess) -> None:
    for call in (client.get, client.delete, client.log, lambda i: list(client.follow_log(i))):
        with pytest.raises(NotFoundError) as not_found:
            call("nobody")
        assert not_found.value.status_code == 404 and "nobody" in not_found.value.detail
    with pytest.raises(NotFoundError):
        client.get("watch")  # the watch endpoint's path, never an instance
    client.create(MODEL, instance_id="twice")
    with pytest.raises(ConflictError) as conflict:
        client.create(MODEL, instance_id="twice")
    assert conflict.value.status_code == 409 and "already exists" in conflict.value.detail
    with pytest.raises(LauncherAPIError) as bad_options:
        client.create("--no-model-here")
    assert type(bad_options.value) is LauncherAPIError and bad_options.value.status_code == 400
    with pytest.raises(LauncherAPIError) as bad_id:
        client.create(MODEL, instance_id="-bad")
    assert bad_id.value.status_code == 400 and "invalid instance id" in bad_id.value.detail
    with pytest.raises(LauncherAPIError) as future:
        client.watch(since=client.list()["revision"] + 100)
    assert future.value.status_code == 400 and "future" in future.value.detail
    with LauncherClient(f"http://127.0.0.1:{free_port()}") as nowhere, pytest.raises(LauncherConnectionError):
        nowhere.health()


def test_log_ranges(client: LauncherClient) -> None:
    client.create(f"{MODEL} --print-env GREETING", instance_id="logged", env_vars={"GREETING": "hello"})
    client.wait_ready("logged", timeout=20)
    full = client.log("logged")
    assert b"ENV GREETING=hello\n" in full and b"standin serving standin-model" in full
    assert client.log("logged", 0, 3) == full[:4]
    assert client.log("logged", end=3) == full[:4]
    assert client.log("logged", 5) == full[5:]
    assert client.log("logged", 2, 10**9) == full[2:]
    assert client.log("logged", len(full)) == b""  # 416: nothing new
    assert client.log_size("logged") == len(full)
    assert b"".join(client.iter_log("logged", 7)) == full[7:]


def test_follow_log_collects_the_whole_output_until_a_crash(client: LauncherClient) -> None:
    client.create(f"{MODEL} --spam-lines 2000 --crash-after 1 --exit-code 4", instance_id="chatty")
    started = time.monotonic()
    collected = b"".join(client.follow_log("chatty", poll_interval=0.1))
    assert time.monotonic() - started < 30
    state = client.get("chatty")
    assert state["status"] == "stopped" and state["exit_code"] == 4
    _assert_spam(collected, 2000)
    assert collected.rstrip().endswith(b"standin crashing with code 4")
    assert collected == b"".join(client.iter_log("chatty"))  # nothing missed, nothing doubled


def test_follow_log_ends_when_the_instance_is_deleted(client: LauncherClient, launcher: LauncherProcess) -> None:
    client.create(MODEL, instance_id="followed")
    client.wait_ready("followed", timeout=20)
    deleter = threading.Timer(0.5, lambda: launcher.client.delete("/v2/vllm/instances/followed"))
    deleter.start()
    try:
        collected = b"".join(client.follow_log("followed", poll_interval=0.1, stop_when_stopped=False))
    finally:
        deleter.join()
    assert b"standin serving" in collected


def test_watch_sees_created_ready_deleted(client: LauncherClient) -> None:
    since = client.list()["revision"]
    seen: list[WatchEvent] = []
    with client.watch(since=since, read_timeout=30) as events:
        client.create(MODEL, instance_id="watched")
        for event in events:
            seen.append(event)
            if event["type"] == "READY":
                client.delete("watched")
            if event["type"] == "DELETED":
                break
    assert [(event["type"], event["object"]["instance_id"]) for event in seen] == [
        ("CREATED", "watched"),
        ("READY", "watched"),
        ("DELETED", "watched"),
    ]
    revisions = [event["object"]["revision"] for event in seen]
    assert revisions == list(range(since + 1, since + 4))


def test_watch_without_since_starts_with_existing_instances(client: LauncherClient) -> None:
    for name in ("pre-a", "pre-b"):
        client.create(MODEL, instance_id=name)
    with client.watch(read_timeout=30) as events:
        first = [next(events), next(events)]
    assert [(event["type"], event["object"]["instance_id"]) for event in first] == [
        ("CREATED", "pre-a"),
        ("CREATED", "pre-b"),
    ]


def test_wait_ready_returns_the_ready_state(client: LauncherClient) -> None:
    client.create(f"{MODEL} --startup-delay 0.5", instance_id="slow")
    polls: list[float] = []
    state = client.wait_ready("slow", timeout=20, poll_interval=0.05, on_poll=lambda s, elapsed: polls.append(elapsed))
    assert state["ready"] is True
    assert (state["start_seconds"] or 0) >= 0.5
    assert len(polls) > 1 and polls == sorted(polls)
    assert httpx.get(f"http://127.0.0.1:{state['port']}/health").status_code == 200


def test_wait_ready_raises_when_the_instance_stops(client: LauncherClient) -> None:
    client.create(FAILS_AT_START, instance_id="doomed")
    with pytest.raises(InstanceStoppedError) as stopped:
        client.wait_ready("doomed", timeout=20)
    assert stopped.value.exit_code not in (0, None)
    assert stopped.value.exit_code == client.get("doomed")["exit_code"]
    assert "exit code" in str(stopped.value)


def test_wait_ready_timeout_unknown_and_deleted(client: LauncherClient, launcher: LauncherProcess) -> None:
    with pytest.raises(NotFoundError):
        client.wait_ready("nobody", timeout=1)
    client.create(f"{MODEL} --startup-delay 60", instance_id="sleepy")
    started = time.monotonic()
    with pytest.raises(WaitTimeoutError) as timed_out:
        client.wait_ready("sleepy", timeout=0.5, poll_interval=0.1)
    assert isinstance(timed_out.value, TimeoutError) and time.monotonic() - started < 5
    deleter = threading.Timer(0.3, lambda: launcher.client.delete("/v2/vllm/instances/sleepy"))
    deleter.start()
    try:
        with pytest.raises(InstanceStoppedError):
            client.wait_ready("sleepy", timeout=30, poll_interval=0.05)
    finally:
        deleter.join()


# ---------------------------------------------------------------------------------- CLI


def test_cli_create_wait_prints_the_url_and_the_rest_works(launcher: LauncherProcess) -> None:
    created = run_cli(launcher, "create", MODEL, "--id", "cli-a", "--env", "K=V", "--annotation", "team=x", "--wait")
    assert created.returncode == 0, created.stderr
    port = launcher.state("cli-a")["port"]
    assert created.stdout == f"http://127.0.0.1:{port}\n"
    assert "waiting for cli-a" in created.stderr and "ready" in created.stderr
    assert httpx.get(created.stdout.strip() + "/health").status_code == 200
    assert launcher.state("cli-a")["env_vars"] == {"K": "V"}

    listed = run_cli(launcher, "list")
    assert listed.returncode == 0
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "READY", "PORT", "PID", "MODEL", "MEMORY", "AGE"]
    assert rows[0].split()[:4] == ["cli-a", "running", "yes", str(port)]

    got = run_cli(launcher, "get", "cli-a")
    assert got.returncode == 0 and re.search(r"^status:\s+running$", got.stdout, re.MULTILINE)
    assert f"http://127.0.0.1:{port}" in got.stdout

    logs = run_cli(launcher, "logs", "cli-a")
    assert logs.returncode == 0 and "standin serving standin-model" in logs.stdout

    deleted = run_cli(launcher, "delete", "cli-a")
    assert deleted.returncode == 0 and deleted.stdout == "deleted cli-a\n"
    assert run_cli(launcher, "get", "cli-a").returncode == 3


def test_cli_options_after_double_dash_and_global_options_after_the_command(launcher: LauncherProcess) -> None:
    created = run_cli(None, "create", "--id", "dashed", "--url", launcher.base_url, "--", "--model", "m two")
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("created dashed (pid ")
    state = launcher.state("dashed")
    assert state["options"] == "--model 'm two'" and state["model"] == "m two"


def test_cli_json_output_parses(launcher: LauncherProcess) -> None:
    created = run_cli(launcher, "--json", "create", MODEL, "--id", "js", "--gpu", "GPU-2", "--wait")
    assert created.returncode == 0, created.stderr
    ready = json.loads(created.stdout)
    assert ready["instance_id"] == "js" and ready["ready"] is True and ready["gpu_uuids"] == ["GPU-2"]
    listed = json.loads(run_cli(launcher, "list", "--json").stdout)
    assert [item["instance_id"] for item in listed["instances"]] == ["js"]
    assert json.loads(run_cli(launcher, "get", "js", "--json").stdout)["port"] == ready["port"]
    gpus = json.loads(run_cli(launcher, "gpus", "--json").stdout)
    assert gpus["gpus"][2]["instances"] == ["js"]
    deleted = json.loads(run_cli(launcher, "delete", "--all", "--json").stdout)
    assert deleted["total_stopped"] == 1


def test_cli_exit_codes(launcher: LauncherProcess) -> None:
    missing = run_cli(launcher, "get", "nobody")
    assert missing.returncode == 3 and "nobody" in missing.stderr and missing.stdout == ""
    assert run_cli(launcher, "create", MODEL, "--id", "dup").returncode == 0
    duplicate = run_cli(launcher, "create", MODEL, "--id", "dup")
    assert duplicate.returncode == 4 and "already exists" in duplicate.stderr
    bad = run_cli(launcher, "create", "--model standin-model --no-such-flag")
    assert bad.returncode == 1 and "HTTP 400" in bad.stderr
    assert run_cli(None, "--url", f"http://127.0.0.1:{free_port()}", "list").returncode == 6
    for usage in (["delete"], ["delete", "dup", "--all"], ["create", MODEL, "--env", "novalue"], ["frobnicate"], []):
        assert run_cli(launcher, *usage).returncode == 2, usage


def test_cli_create_wait_of_a_crashing_instance_exits_5(launcher: LauncherProcess) -> None:
    crashed = run_cli(launcher, "create", FAILS_AT_START, "--id", "crasher", "--wait", "--timeout", "30")
    assert crashed.returncode == 5, crashed.stderr
    assert crashed.stdout == ""
    assert "exit code" in crashed.stderr and "crasher" in crashed.stderr
    assert "last lines of crasher's log" in crashed.stderr  # the traceback says why


def test_cli_create_wait_times_out_with_exit_7(launcher: LauncherProcess) -> None:
    slow = run_cli(launcher, "create", f"{MODEL} --startup-delay 60", "--id", "slowpoke", "--wait", "--timeout", "0.5")
    assert slow.returncode == 7 and "not ready after 0.5s" in slow.stderr
    assert launcher.state("slowpoke")["status"] == "running"  # left running, as the message says


def test_cli_logs_prints_more_than_a_mebibyte_and_follows_to_the_end(launcher: LauncherProcess) -> None:
    # 8000 lines per stream is ~1.2 MiB: more than one Range answer.
    assert run_cli(launcher, "create", f"{MODEL} --spam-lines 8000 --crash-after 0.5", "--id", "big").returncode == 0
    followed = subprocess.run(
        [sys.executable, "-m", "launcher.client.cli", "--url", launcher.base_url, "logs", "big", "-f"],
        check=False,
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    assert followed.returncode == 0, followed.stderr
    assert len(followed.stdout) > 2**20
    _assert_spam(followed.stdout, 8000)
    assert launcher.state("big")["status"] == "stopped"
    whole = subprocess.run(
        [sys.executable, "-m", "launcher.client.cli", "--url", launcher.base_url, "logs", "big"],
        check=False,
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    assert whole.returncode == 0 and whole.stdout == followed.stdout
    assert run_cli(launcher, "logs", "nobody").returncode == 3


def test_cli_delete_all_and_gpus_table(launcher: LauncherProcess) -> None:
    assert run_cli(launcher, "create", MODEL, "--id", "g1", "--gpu", "GPU-0", "--gpu", "GPU-3").returncode == 0
    assert run_cli(launcher, "create", MODEL, "--id", "g2").returncode == 0
    table = run_cli(launcher, "gpus")
    assert table.returncode == 0
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["INDEX", "UUID", "NAME", "MEMORY", "INSTANCES"]
    users = {row.split()[1]: row.split()[-1] for row in rows}
    assert users["GPU-0"] == "g1" and users["GPU-3"] == "g1" and users["GPU-1"] == "-"
    deleted = run_cli(launcher, "delete", "--all")
    assert deleted.returncode == 0 and deleted.stdout.startswith("deleted 2 instance(s): ")
    assert set(deleted.stdout.split(": ", 1)[1].strip().split(", ")) == {"g1", "g2"}
    assert run_cli(launcher, "list").stderr == "no instances\n"


@pytest.mark.parametrize("machine", [False, True])
def test_cli_watch_prints_one_line_per_event(launcher: LauncherProcess, machine: bool) -> None:
    since = launcher.client.get("/v2/vllm/instances").json()["revision"]
    command = [sys.executable, "-m", "launcher.client.cli", "--url", launcher.base_url, "watch", "--since", str(since)]
    watcher = subprocess.Popen(
        [*command, *(["--json"] if machine else [])],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    guard = threading.Timer(60, watcher.kill)  # a missing event fails the test instead of hanging it
    guard.start()
    try:
        assert run_cli(launcher, "create", MODEL, "--id", "seen", "--wait").returncode == 0
        assert run_cli(launcher, "delete", "seen").returncode == 0
        assert watcher.stdout is not None
        lines = [watcher.stdout.readline() for _ in range(3)]  # CREATED, READY, DELETED
    finally:
        guard.cancel()
        watcher.terminate()
        watcher.wait(10)
        if watcher.stdout is not None:
            watcher.stdout.close()
        if watcher.stderr is not None:
            watcher.stderr.close()
    if machine:
        events = [json.loads(line) for line in lines]
        assert [(e["type"], e["object"]["instance_id"]) for e in events] == [
            ("CREATED", "seen"),
            ("READY", "seen"),
            ("DELETED", "seen"),
        ]
    else:
        assert [line.split()[2:4] for line in lines] == [["CREATED", "seen"], ["READY", "seen"], ["DELETED", "seen"]]


def test_cli_unreachable_launcher_exits_6_with_a_clear_message() -> None:
    result = run_cli(None, "--url", f"127.0.0.1:{free_port()}", "get", "x")
    assert result.returncode == 6 and "cannot reach the launcher" in result.stderr


# ---------------------------------------------------------------------------------- helpers


def test_formatting_helpers() -> None:
    assert [format_age(s) for s in (0, 59, 150, 7300, 200000)] == ["0s", "59s", "2m", "2h", "2d"]
    assert format_table(["A", "BB"], [["xyz", 1]]) == "A    BB\nxyz  1"
    assert instance_url("http://node:8001", 8000) == "http://node:8000"
    assert instance_url("http://node:8001", 8000, "--model m --host 10.0.0.5") == "http://10.0.0.5:8000"
    assert instance_url("http://node:8001", 8000, "--host=0.0.0.0") == "http://node:8000"
    assert instance_url("http://[::1]:8001", 8000) == "http://[::1]:8000"


def test_front_door_models_through_the_client(client: LauncherClient, launcher: LauncherProcess) -> None:
    added = client.put_model("echo", "--model E", aliases=["echo2"], idle_timeout=0)
    assert added["state"] == "stopped" and added["aliases"] == ["echo2"] and added["idle_timeout"] == 0
    assert [model["name"] for model in client.models()["models"]] == ["echo"]
    assert client.start_model("echo")["state"] == "ready"
    assert client.model("echo2")["instance_id"]
    assert client.stop_model("echo")["state"] == "stopped"
    assert client.delete_model("echo") == {"status": "deleted", "name": "echo"}
    with pytest.raises(NotFoundError):
        client.model("echo")


def test_launcherctl_models(launcher: LauncherProcess) -> None:
    added = run_cli(launcher, "models", "add", "chat", "--model C", "--alias", "chat2", "--idle-timeout", "0")
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == "chat: stopped"
    assert run_cli(launcher, "models", "start", "chat").stdout.strip() == "chat: ready"
    listing = run_cli(launcher, "models")
    assert listing.returncode == 0
    header, row = listing.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "STATE", "COMPILED", "INSTANCE"]
    assert row.split()[:3] == ["chat", "ready", "yes"] and "chat2" in row and "never" in row
    assert run_cli(launcher, "models", "warm", "chat").stdout.strip() == "chat: compiled yes"  # nothing to do
    assert run_cli(launcher, "models", "remove", "chat").stdout.strip() == "chat: deleted"
    assert run_cli(launcher, "models", "stop", "chat").returncode == 3  # not found
    assert run_cli(launcher, "models", "add", "lonely").returncode == 2  # usage: no options


def test_cli_takes_vllm_flags_unquoted_for_create_and_models_add(launcher: LauncherProcess) -> None:
    created = run_cli(launcher, "create", "--id", "bare", "--model", "m", "--served-model-name", "a", "b", "--wait")
    assert created.returncode == 0, created.stderr
    assert launcher.state("bare")["options"] == "--model m --served-model-name a b"
    added = run_cli(launcher, "models", "add", "bare-model", "--model", "m", "--alias", "bm", "--fast")
    assert added.returncode == 0, added.stderr
    profile = launcher.client.get("/v2/vllm/models/bare-model").json()
    assert profile["options"] == "--model m --fast" and profile["aliases"] == ["bm"]
    assert run_cli(launcher, "models", "remove", "bare-model").returncode == 0
    os.killpg(launcher.state("bare")["pid"], signal.SIGKILL)
    wait_until(lambda: launcher.state("bare")["status"] == "stopped", 10, what="stopped")
    listed = run_cli(launcher, "list")
    row = next(line for line in listed.stdout.splitlines() if line.startswith("bare "))
    assert row.split()[1:5] == ["stopped", "(exit", "-9)", "-"], row  # a stopped instance is not "ready: yes"
    assert run_cli(launcher, "delete", "bare").returncode == 0


def test_cli_models_logs_shows_the_running_instances_log_or_the_failed_starts(launcher: LauncherProcess) -> None:
    assert run_cli(launcher, "models", "add", "logged", "--model", "m").returncode == 0
    assert run_cli(launcher, "models", "start", "logged").returncode == 0
    shown = run_cli(launcher, "models", "logs", "logged")
    assert shown.returncode == 0 and "standin serving m" in shown.stdout
    hint = run_cli(launcher, "logs", "logged")
    assert hint.returncode == 3 and "'logged' is a model: launcherctl models logs logged" in hint.stderr
    assert run_cli(launcher, "models", "add", "failing", "--model", "f", "--fail-at-start").returncode == 0
    assert run_cli(launcher, "models", "start", "failing").returncode != 0
    failed = run_cli(launcher, "models", "logs", "failing")
    assert failed.returncode == 0 and "standin failing at start" in failed.stdout
    for name in ("logged", "failing"):
        assert run_cli(launcher, "models", "remove", name).returncode == 0
