"""A newcomer's usual mistakes get a clear error, early (stand-in workload: fast).

Bad options in a models file stop the launcher at start, naming the profile and the parser's
message; a busy API port fails before any forkserver is started; a failed start says why in one
line; a typo'd create field is reported in the answer's body; replayed watch events keep their
times. The real vLLM's side (local model paths, vLLM's error lines) is in test_vllm_e2e.py and
test_front_door_vllm.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from launcher.client.cli import format_event
from tests.launcher_process import REPO, VLLM_ENV, LauncherProcess, free_port, wait_until


def run_launcher(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m launcher ARGS`` to its end (a start-up error), with private directories."""
    with tempfile.TemporaryDirectory(prefix="fh-") as workdir:
        child_env = {key: value for key, value in os.environ.items() if not key.startswith("LAUNCHER_")}
        child_env |= {
            "LAUNCHER_FORKSERVER_WORKLOAD": "standin",
            "LAUNCHER_LOG_DIR": f"{workdir}/logs",
            "LAUNCHER_RUNTIME_DIR": f"{workdir}/run",
            "TMPDIR": workdir,
            **env,
        }
        return subprocess.run(
            [sys.executable, "-m", "launcher", "--host", "127.0.0.1", *args],
            cwd=REPO,
            env=child_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ("--model M --max-model-lenn 5", "unrecognized arguments: --max-model-lenn 5"),
        ("--max-model-len 5", "the following arguments are required: --model"),
    ],
)
def test_options_the_parser_rejects_make_that_model_invalid_not_the_launcher(
    tmp_path: Path, options: str, words: str
) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(f'models:\n  good: {{options: "--model G"}}\n  tiny: {{options: "{options}"}}\n')
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_MODELS_FILE": str(models)})
    try:
        tiny = wait_until(lambda: (s := launcher.client.get("/v2/vllm/models/tiny").json())["state"] == "invalid" and s,
                          10, what="tiny invalid")  # fmt: skip
        assert words in tiny["last_error"]
        answer = launcher.client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "model_invalid", answer.text
        assert words in answer.json()["error"]["message"]
        assert launcher.client.post("/v1/completions", json={"model": "good", "prompt": "x"}).status_code == 200
        assert f"model tiny cannot be started: standin: error: {words}" in launcher.output_text()
    finally:
        assert not launcher.stop()


def test_a_profile_put_with_the_same_mistake_is_refused_alike(tmp_path: Path) -> None:
    launcher = LauncherProcess(workload="standin")
    try:
        answer = launcher.client.put("/v2/vllm/models/tiny", json={"options": "--model M --max-model-lenn 5"})
        assert answer.status_code == 400 and "unrecognized arguments: --max-model-lenn 5" in answer.json()["detail"]
        answer = launcher.client.put("/v2/vllm/models/tiny", json={"options": "--model M", "alias": ["t"]})
        assert answer.status_code == 422
        assert "unknown field 'alias' in model 'tiny' (did you mean 'aliases'?)" in answer.json()["detail"]
    finally:
        assert not launcher.stop()


def test_a_busy_api_port_fails_before_the_forkserver_starts() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        done = run_launcher("--port", str(port), env={}, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [f"launcher: port {port} on 127.0.0.1 is already in use: stop what holds it, or pick another "
                     "with --port (LAUNCHER_PORT; `make run PORT=...`)"], lines  # fmt: skip
    assert "forkserver" not in done.stdout + done.stderr  # nothing was started


@pytest.fixture(scope="module")
def standin_launcher() -> Iterator[LauncherProcess]:
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_STOP_TIMEOUT": "2"})
    yield launcher
    assert not launcher.stop()


def test_a_failed_start_has_a_one_line_stop_reason(standin_launcher: LauncherProcess) -> None:
    answer = standin_launcher.create("fails", options=f"--model M --port {free_port()} --fail-at-start --exit-code 7")
    assert answer.status_code == 201, answer.text
    state = wait_until(lambda: (s := standin_launcher.state("fails"))["status"] == "stopped" and s, 30, what="stop")
    assert state["exit_code"] == 7
    assert state["stop_reason"] == "standin failing at start with code 7"  # the log's last line: no traceback
    deleted = standin_launcher.client.delete("/v2/vllm/instances/fails")
    assert deleted.status_code == 200


def test_an_instance_killed_by_a_signal_gets_no_made_up_reason(standin_launcher: LauncherProcess) -> None:
    answer = standin_launcher.create("killed", options=f"--model M --port {free_port()}")
    assert answer.status_code == 201
    wait_until(lambda: standin_launcher.state("killed")["ready"], 30, what="ready")
    os.kill(answer.json()["pid"], signal.SIGKILL)  # its log ends with "standin serving ...": not a reason
    state = wait_until(lambda: (s := standin_launcher.state("killed"))["status"] == "stopped" and s, 30, what="stop")
    assert state["exit_code"] == -signal.SIGKILL and "stop_reason" not in state, state
    standin_launcher.client.delete("/v2/vllm/instances/killed")


def test_ignored_create_fields_are_named_in_the_body_with_the_likely_field(standin_launcher: LauncherProcess) -> None:
    answer = standin_launcher.create("typo", options=f"--model M --port {free_port()}", env_var={"A": "1"})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["ignored_fields"] == ["env_var"]
    assert body["warning"] == "unknown fields ignored: env_var (did you mean 'env_vars'?)"
    assert answer.headers["warning"] == '299 - "unknown fields ignored: env_var"'
    standin_launcher.client.delete("/v2/vllm/instances/typo")


def test_replayed_watch_events_keep_the_time_they_happened(standin_launcher: LauncherProcess) -> None:
    before = time.time()
    answer = standin_launcher.create("timed", options=f"--model M --port {free_port()}")
    assert answer.status_code == 201
    revision = answer.json()["revision"]
    wait_until(lambda: standin_launcher.state("timed")["ready"], 30, what="ready")
    time.sleep(1.2)  # a replay now is more than a second after the events
    with httpx.stream("GET", f"{standin_launcher.base_url}/v2/vllm/instances/watch",
                      params={"since": revision - 1}, timeout=10) as stream:  # fmt: skip
        lines = stream.iter_lines()
        created = httpx.Response(200, content=next(lines)).json()
    assert created["type"] == "CREATED" and created["object"]["instance_id"] == "timed"
    assert before <= created["time"] <= created["object"]["created_at"] + 1
    printed = format_event(created)
    assert printed.startswith(time.strftime("%H:%M:%S ", time.localtime(created["time"]))), printed
    standin_launcher.client.delete("/v2/vllm/instances/timed")


@pytest.mark.vllm
def test_vllms_parser_checks_each_profile_and_a_bad_one_is_that_models_problem(tmp_path: Path, tiny_model: Path) -> None:
    """The real vLLM: a typo in one profile's options and a model folder not there yet make those
    two invalid (answered at once, with the reason); the launcher serves the good one; the folder
    made later makes its model servable at the next request."""
    models = tmp_path / "models.yaml"
    nowhere = tmp_path / "not-synced-yet"
    flags = "--enforce-eager --max-model-len 256 --kv-cache-memory-bytes 32M"
    models.write_text(
        "models:\n"
        f'  good: {{options: "--model {tiny_model} {flags}"}}\n'
        f'  typo: {{options: "--model {tiny_model} --max-model-lenn 5"}}\n'
        f'  nowhere: {{options: "--model {nowhere} {flags}"}}\n'
    )
    launcher = LauncherProcess(workload="vllm", env={**VLLM_ENV, "LAUNCHER_MODELS_FILE": str(models)},
                               ready_timeout=300)  # fmt: skip
    try:
        def state(name: str) -> dict[str, Any]:
            return dict(launcher.client.get(f"/v2/vllm/models/{name}").json())

        wait_until(lambda: state("typo")["state"] == state("nowhere")["state"] == "invalid", 60, what="invalid")
        assert "vllm serve: error: unrecognized arguments: --max-model-lenn" in state("typo")["last_error"]
        assert f"--model {nowhere}: no such file or directory" in state("nowhere")["last_error"]
        answer = launcher.client.post("/v1/completions", json={"model": "nowhere", "prompt": "x", "max_tokens": 2})
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "model_invalid", answer.text
        good = launcher.client.post("/v1/completions", json={"model": "good", "prompt": "x", "max_tokens": 2},
                                    timeout=300)  # fmt: skip
        assert good.status_code == 200, good.text
        shutil.copytree(tiny_model, nowhere)  # the volume finished syncing
        time.sleep(1.1)  # an invalid model is checked again at most once a second
        answer = launcher.client.post("/v1/completions", json={"model": "nowhere", "prompt": "x", "max_tokens": 2},
                                      timeout=300)  # fmt: skip
        assert answer.status_code == 200, answer.text
        assert state("nowhere")["state"] == "ready" and state("typo")["state"] == "invalid"
    finally:
        assert not launcher.stop()


@pytest.mark.vllm
def test_a_launcher_stopped_while_vllm_preloads_ends_its_forkserver_at_once() -> None:
    with tempfile.TemporaryDirectory(prefix="fh-") as workdir:
        env = {key: value for key, value in os.environ.items() if not key.startswith("LAUNCHER_")}
        env |= {"LAUNCHER_LOG_DIR": f"{workdir}/logs", "LAUNCHER_RUNTIME_DIR": f"{workdir}/run", "TMPDIR": workdir}
        process = subprocess.Popen(
            [sys.executable, "-m", "launcher", "--host", "127.0.0.1", "--port", str(free_port())],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            wait_until(lambda: psutil.Process(process.pid).children(), 30, what="the forkserver")  # preloading
            [forkserver] = psutil.Process(process.pid).children()
            process.terminate()
            output, _ = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
        assert not forkserver.is_running()
        assert "did not exit in time" not in output, output  # it is not left to finish its preload first
        assert "Traceback" not in output, output


def test_errors_under_v1_are_openai_shaped_and_an_unknown_model_gets_did_you_mean(tmp_path: Path) -> None:
    import openai

    models = tmp_path / "models.yaml"
    models.write_text('models:\n  tiny: {options: "--model T", aliases: [tiny-chat]}\n')
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_MODELS_FILE": str(models),
                                                        "LAUNCHER_API_TOKEN": "s3cret"})  # fmt: skip
    try:
        wrong = openai.OpenAI(base_url=f"{launcher.base_url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="missing or wrong bearer token"):
            wrong.completions.create(model="tiny", prompt="x")
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=f"{launcher.base_url}/v1", api_key="s3cret", max_retries=0)
        with pytest.raises(openai.NotFoundError, match="did you mean 'tiny-chat'"):
            right.completions.create(model="tiny-chta", prompt="x")
        answer = launcher.client.get("/v1/models/tiny-chta", headers={"Authorization": "Bearer s3cret"})
        assert answer.status_code == 404 and "did you mean 'tiny-chat'" in answer.json()["error"]["message"]
        assert launcher.client.get("/v2/vllm/instances").json() == {"detail": "missing or wrong bearer token: send "
                                                                    "'Authorization: Bearer <token>'"}  # fmt: skip
    finally:
        assert not launcher.stop()


def test_an_open_api_is_said_loudly_and_instances_listen_where_the_launcher_does(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "LAUNCHER_FORKSERVER_WORKLOAD": "standin", "LAUNCHER_LOG_DIR": str(tmp_path / "logs"),
           "TMPDIR": str(tmp_path)}  # fmt: skip
    opened = subprocess.Popen([sys.executable, "-m", "launcher", "--host", "0.0.0.0", "--port", str(port)], cwd=REPO,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until(lambda: _serving(opened, port), 60, 0.2, "the launcher")
    finally:
        opened.terminate()
        _, stderr = opened.communicate(timeout=60)
    assert f"launcher: WARNING: the API listens on 0.0.0.0:{port} with no token" in stderr, stderr

    launcher = LauncherProcess(workload="standin")  # --host 127.0.0.1
    try:
        def listening(instance_id: str) -> set[str]:
            process = psutil.Process(launcher.state(instance_id)["pid"])
            return {conn.laddr.ip for conn in process.net_connections() if conn.status == psutil.CONN_LISTEN}

        assert launcher.create("local", options="--model m").status_code == 201
        wait_until(lambda: launcher.state("local")["ready"], 10, what="ready")
        assert launcher.state("local")["options"] == "--model m"  # echoed as given
        assert listening("local") == {"127.0.0.1"}
        assert launcher.create("everywhere", options="--model m --host 0.0.0.0").status_code == 201
        wait_until(lambda: launcher.state("everywhere")["ready"], 10, what="ready")
        assert listening("everywhere") == {"0.0.0.0"}
        assert "WARNING" not in launcher.output_text()  # on loopback: nothing to warn of
    finally:
        assert not launcher.stop()


def test_ctrl_c_while_an_instance_starts_says_what_it_waits_for_and_does_not_wait_long() -> None:
    """vLLM can hang on SIGTERM while it starts (the stand-in's --ignore-sigterm): that instance gets
    --stop-timeout-starting (2 s), not --stop-timeout (30 s here), at shutdown as at DELETE."""
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_STOP_TIMEOUT": "30"}, log_level="info")
    assert launcher.create("slow", options="--model m --ignore-sigterm --startup-delay 60").status_code == 201
    started = time.monotonic()
    launcher.process.send_signal(signal.SIGINT)
    launcher.process.wait(timeout=60)
    took = time.monotonic() - started
    output = launcher.output_text()
    assert not launcher.stop()
    assert "shutting down: stopping 1 instance(s); 1 still starting, given 2s" in output, output
    assert took < 15, f"{took:.1f} s: the starting instance got the long deadline"


def test_uvicorn_on_another_port_gets_that_ports_log_directory(tmp_path: Path) -> None:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("LAUNCHER_")}
    env.update({"LAUNCHER_FORKSERVER_WORKLOAD": "standin", "TMPDIR": str(tmp_path)})
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "launcher.app:app", "--port", str(port)], cwd=REPO,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    try:
        wait_until(lambda: _serving(server, port), 60, 0.2, "the launcher")
        state = tmp_path / f"vllm-launcher-{os.getuid()}"
        assert (state / str(port) / "logs").is_dir() and not (state / "8001").exists()
    finally:
        server.terminate()
        server.wait(timeout=60)


def _serving(process: subprocess.Popen[Any], port: int) -> bool:
    """The launcher on ``port`` answers /health with 200 (or its process ended: nothing to wait for)."""
    try:
        return process.poll() is not None or httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    except httpx.TransportError:
        return False
