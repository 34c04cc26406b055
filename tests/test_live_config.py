"""The models file is the truth while the launcher runs (real launcher, stand-in workload).

Edits are applied within a second or two (a watch, and a poll), a ConfigMap's symlink swap too,
and on SIGHUP; a broken edit keeps the running models and shows the error; ``PUT`` and
``DELETE`` write the file back with its comments; a read-only file refuses them with a 409; with
no models file the answer says that changes are not kept. The real vLLM's invalid profiles are in
test_first_hour.py.
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.launcher_process import REPO, LauncherProcess, free_port, wait_until
from tests.test_front_door_standin import ask, front_door, metric

HEADER = "# The node's models: edit freely, the launcher keeps this comment.\nidle_timeout: 300\nmodels:\n"


def names(launcher: LauncherProcess) -> list[str]:
    return [model["name"] for model in launcher.client.get("/v2/vllm/models").json()["models"]]


def listing(launcher: LauncherProcess) -> dict[str, Any]:
    return dict(launcher.client.get("/v2/vllm/models").json())


def write(path: Path, text: str) -> None:
    """Replace the file as editors do: a new file renamed over the old one."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


@pytest.fixture
def models_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(HEADER + '  a: {options: "--model A"}  # the first one\n  b: {options: "--model B"}\n')
    return path


def test_an_edit_adds_and_removes_models_within_two_seconds(models_file: Path) -> None:
    with front_door(models_file.parent, models_file.read_text()) as launcher:
        assert ask(launcher, "b").status_code == 200
        b_instance = launcher.client.get("/v2/vllm/models/b").json()["instance_id"]
        started = time.monotonic()
        write(models_file, HEADER + '  a: {options: "--model A"}\n  c: {options: "--model C", aliases: [cee]}\n')
        wait_until(lambda: names(launcher) == ["a", "c"], 2.0, 0.02, "the edit applied")
        print(f"reload latency: {time.monotonic() - started:.3f} s")
        assert ask(launcher, "cee").status_code == 200
        assert ask(launcher, "b").status_code == 404
        wait_until(lambda: launcher.state(b_instance)["status"] == "stopped"
                   if launcher.client.get(f"/v2/vllm/instances/{b_instance}").status_code == 200 else True,
                   10, what="b's instance stopped")  # fmt: skip
        assert metric(launcher, "launcher_models_file_reloads_total", outcome="applied") >= 1


def test_a_changed_profile_restarts_its_model_once_idle(models_file: Path) -> None:
    with front_door(models_file.parent, models_file.read_text()) as launcher:
        assert ask(launcher, "a").status_code == 200
        first = launcher.client.get("/v2/vllm/models/a").json()["instance_id"]
        write(models_file, models_file.read_text().replace('"--model A"', '"--model A2"'))
        wait_until(lambda: launcher.client.get("/v2/vllm/models/a").json()["options"] == "--model A2", 3, 0.02,
                   "the change applied")  # fmt: skip
        answer = ask(launcher, "a")
        assert answer.status_code == 200
        assert launcher.client.get("/v2/vllm/models/a").json()["instance_id"] != first


def test_a_broken_edit_keeps_the_running_models_and_says_why(models_file: Path) -> None:
    with front_door(models_file.parent, models_file.read_text()) as launcher:
        assert ask(launcher, "a").status_code == 200
        good = models_file.read_text()
        write(models_file, good + "  c: {options: --model C, aliass: [x]}\n")
        error = wait_until(lambda: listing(launcher)["file_error"], 3, 0.02, "the error shown")
        assert "line 6" in error and "unknown field 'aliass'" in error and "(did you mean 'aliases'?)" in error
        assert names(launcher) == ["a", "b"] and ask(launcher, "a").status_code == 200
        assert metric(launcher, "launcher_models_file_reloads_total", outcome="error") == 1
        assert "launcher_models_file_error 1.0" in launcher.client.get("/metrics").text
        reload = launcher.client.post("/v2/vllm/models/reload")
        assert reload.status_code == 422 and "unknown field 'aliass'" in reload.json()["detail"]
        refused = launcher.client.put("/v2/vllm/models/d", json={"options": "--model D"})
        assert refused.status_code == 409 and "fix it first" in refused.json()["detail"]
        write(models_file, good)
        wait_until(lambda: listing(launcher)["file_error"] is None, 3, 0.02, "the error gone")
        assert "launcher_models_file_error 0.0" in launcher.client.get("/metrics").text
        assert "models file not reloaded (changed), the running models stay" in launcher.output_text()


def test_sighup_reloads_the_models_file(models_file: Path) -> None:
    with front_door(models_file.parent, models_file.read_text(), LAUNCHER_WATCH_MODELS_FILE="0") as launcher:
        models_file.write_text(models_file.read_text() + '  c: {options: "--model C"}\n')  # in place: no rename
        launcher.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "c" in names(launcher), 3, 0.02, "reloaded on SIGHUP")
        assert launcher.process.poll() is None


def test_a_configmap_update_is_seen(tmp_path: Path) -> None:
    """Kubernetes mounts a ConfigMap as ``models.yaml -> ..data/models.yaml``, ``..data -> ..<stamp>``,
    and updates it by swapping ``..data`` atomically."""
    mount = tmp_path / "config"
    (mount / "..2026_01").mkdir(parents=True)
    (mount / "..2026_01" / "models.yaml").write_text('models:\n  a: {options: "--model A"}\n')
    os.symlink("..2026_01", mount / "..data")
    os.symlink("..data/models.yaml", mount / "models.yaml")
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_MODELS_FILE": str(mount / "models.yaml")})
    try:
        assert names(launcher) == ["a"]
        (mount / "..2026_02").mkdir()
        (mount / "..2026_02" / "models.yaml").write_text('models:\n  a: {options: "--model A"}\n  z: {options: "--model Z"}\n')
        os.symlink("..2026_02", mount / "..data_tmp")
        os.replace(mount / "..data_tmp", mount / "..data")  # the atomic swap
        wait_until(lambda: names(launcher) == ["a", "z"], 3, 0.02, "the new ConfigMap seen")
        # A ConfigMap is read-only: the API refuses to change it, and says where to.
        for path in mount.rglob("models.yaml"):
            path.chmod(0o444)
        (mount / "..2026_02").chmod(0o555)
        refused = launcher.client.put("/v2/vllm/models/y", json={"options": "--model Y"})
        assert refused.status_code == 409 and "read-only" in refused.json()["detail"], refused.text
        assert names(launcher) == ["a", "z"]
    finally:
        (mount / "..2026_02").chmod(0o755)
        launcher.stop()


def test_api_changes_are_written_back_and_survive_a_restart(models_file: Path) -> None:
    env = {"LAUNCHER_MODELS_FILE": str(models_file)}
    launcher = LauncherProcess(workload="standin", env=env)
    try:
        assert launcher.client.put("/v2/vllm/models/c", json={"options": "--model C", "aliases": ["see"],
                                                              "idle_timeout": 60}).status_code == 201  # fmt: skip
        changed = launcher.client.put("/v2/vllm/models/a", json={"options": "--model A --fast"})
        assert changed.status_code == 200 and "warning" not in changed.json()
        assert launcher.client.delete("/v2/vllm/models/b").status_code == 200
        text = models_file.read_text()
        assert text.startswith(HEADER) and "# the first one" in text, text
        assert "b:" not in text and "--model A --fast" in text and "see" in text
        assert names(launcher) == ["a", "c"]
    finally:
        launcher.stop()
    launcher = LauncherProcess(workload="standin", env=env)
    try:
        assert names(launcher) == ["a", "c"]
        assert launcher.client.get("/v2/vllm/models/see").json()["idle_timeout"] == 60
    finally:
        launcher.stop()


def test_a_read_only_models_file_refuses_api_changes(models_file: Path) -> None:
    models_file.chmod(0o444)
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_MODELS_FILE": str(models_file)})
    try:
        before = models_file.read_text()
        refused = launcher.client.put("/v2/vllm/models/c", json={"options": "--model C"})
        assert refused.status_code == 409 and "is read-only" in refused.json()["detail"]
        assert launcher.client.delete("/v2/vllm/models/a").status_code == 409
        assert models_file.read_text() == before and names(launcher) == ["a", "b"]
    finally:
        launcher.stop()
        models_file.chmod(0o644)


def test_a_models_file_not_there_yet_is_created_by_the_first_put(tmp_path: Path) -> None:
    path = tmp_path / "new" / "models.yaml"
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_MODELS_FILE": str(path)})
    try:
        assert listing(launcher)["models_file"] == str(path) and names(launcher) == []
        assert launcher.client.put("/v2/vllm/models/x", json={"options": "--model X"}).status_code == 201
        assert "x:" in path.read_text()
        assert "does not exist yet: it is created when a model is added" in launcher.output_text()
    finally:
        launcher.stop()


def test_without_a_models_file_the_answer_says_changes_are_not_kept() -> None:
    launcher = LauncherProcess(workload="standin")
    try:
        created = launcher.client.put("/v2/vllm/models/x", json={"options": "--model X"})
        assert created.status_code == 201 and "not kept across restarts" in created.json()["warning"]
        assert "--models-file" in listing(launcher)["warning"]
        assert launcher.client.post("/v2/vllm/models/reload").status_code == 409
    finally:
        launcher.stop()


def test_a_terminal_hang_up_ends_a_foreground_launcher_cleanly(tmp_path: Path) -> None:
    """Started in a terminal (stdin a tty), SIGHUP means that terminal closed: a clean shutdown."""
    primary, secondary = pty.openpty()
    port = free_port()
    env = {**os.environ, "LAUNCHER_FORKSERVER_WORKLOAD": "standin", "LAUNCHER_LOG_DIR": str(tmp_path / "logs"),
           "TMPDIR": str(tmp_path)}  # fmt: skip
    output = (tmp_path / "out").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "launcher", "--host", "127.0.0.1", "--port", str(port)],
                               cwd=REPO, env=env, stdin=secondary, stdout=output, stderr=subprocess.STDOUT,
                               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))  # fmt: skip  # noqa: PLW1509
    try:
        wait_until(lambda: _healthy(port), 60, 0.1, "the launcher")
        assert [path for path in tmp_path.glob("vllm-launcher-*") if path.name != f"vllm-launcher-{os.getuid()}"]
        process.send_signal(signal.SIGHUP)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn ends with the signal it shut down on
        text = (tmp_path / "out").read_text()
        assert "the terminal closed (SIGHUP): shutting down" in text and "Application shutdown complete" in text
        runtime = [path.name for path in tmp_path.glob("vllm-launcher-*") if path.name != f"vllm-launcher-{os.getuid()}"]
        assert runtime == []  # its runtime directory is gone: nothing left for the next launcher to clean
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(primary)
        os.close(secondary)
        output.close()


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_two_models_swapping_aliases_in_one_edit(tmp_path: Path) -> None:
    models = 'models:\n  x: {options: "--model X", aliases: [p]}\n  y: {options: "--model Y", aliases: [q]}\n'
    with front_door(tmp_path, models) as launcher:
        write(tmp_path / "models.yaml", models.replace("[p]", "[TMP]").replace("[q]", "[p]").replace("[TMP]", "[q]"))
        wait_until(lambda: launcher.client.get("/v2/vllm/models/p").json()["name"] == "y", 3, 0.02, "p is y's")
        assert launcher.client.get("/v2/vllm/models/q").json()["name"] == "x"
        assert listing(launcher)["file_error"] is None


def test_a_file_written_in_place_slowly_is_not_read_half_written(models_file: Path) -> None:
    with front_door(models_file.parent, models_file.read_text()) as launcher:
        assert ask(launcher, "a").status_code == 200
        instance = launcher.client.get("/v2/vllm/models/a").json()["instance_id"]
        text = models_file.read_text()
        with models_file.open("w") as file:  # truncated now, written 0.1 s later (cat >, scp, a slow disk)
            file.flush()
            time.sleep(0.1)
            file.write(text)
        time.sleep(2.5)
        assert names(launcher) == ["a", "b"]
        assert launcher.client.get("/v2/vllm/models/a").json()["instance_id"] == instance  # never removed
        assert "removed" not in launcher.output_text()


def test_a_reload_checks_invalid_models_again_and_warm_refuses_one(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text('models:\n  big: {options: "--model B", memory: 4GiB}\n')
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_MODELS_FILE": str(models),
                                                        "LAUNCHER_MEMORY_BUDGET": "1GiB"})  # fmt: skip
    try:
        wait_until(lambda: launcher.client.get("/v2/vllm/models/big").json()["state"] == "invalid", 10, what="invalid")
        warm = launcher.client.post("/v2/vllm/models/big/warm")
        assert warm.status_code == 409 and "more than the whole budget" in warm.json()["detail"]
        assert launcher.client.get("/v2/vllm/instances").json()["instances"] == []  # nothing forked for it
    finally:
        launcher.stop()
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_MODELS_FILE": str(models),
                                                        "LAUNCHER_MEMORY_BUDGET": "8GiB"})  # fmt: skip
    try:
        models.write_text('models:\n  big: {options: "--model B --nope", preload: true}\n')
        wait_until(lambda: launcher.client.get("/v2/vllm/models/big").json()["state"] == "invalid", 10, what="invalid")
        models.write_text('models:\n  big: {options: "--model B", preload: true}\n')  # fixed: preloaded now
        wait_until(lambda: launcher.client.get("/v2/vllm/models/big").json()["state"] == "ready", 10, what="preloaded")
    finally:
        launcher.stop()


def test_a_put_after_the_file_is_fixed_is_not_refused_for_the_old_error(models_file: Path) -> None:
    with front_door(models_file.parent, models_file.read_text(), LAUNCHER_WATCH_MODELS_FILE="0") as launcher:
        good = models_file.read_text()
        write(models_file, good + "  c: {options: --model C, aliass: [x]}\n")
        assert launcher.client.post("/v2/vllm/models/reload").status_code == 422
        write(models_file, good)  # fixed, no reload since
        assert launcher.client.put("/v2/vllm/models/d", json={"options": "--model D"}).status_code == 201


def test_vllms_model_flag_is_not_taken_for_models_file() -> None:
    done = subprocess.run([sys.executable, "-m", "launcher", "--model", "facebook/opt-125m"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2 and "unknown flag --model; did you mean --models-file?" in done.stderr, done.stderr


def test_a_hang_up_during_shutdown_does_not_cut_the_clean_up(tmp_path: Path) -> None:
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_STOP_TIMEOUT": "3"})
    assert launcher.create("slow", options="--model m --ignore-sigterm").status_code == 201
    wait_until(lambda: launcher.state("slow")["ready"], 10, what="ready")
    launcher.process.send_signal(signal.SIGTERM)  # the clean-up waits ~3 s for the instance...
    time.sleep(0.5)
    launcher.process.send_signal(signal.SIGHUP)  # ...and a hang-up comes meanwhile
    assert launcher.process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert not launcher.stop()  # nothing left: processes, runtime dir
    assert launcher.temp_leftovers == []


def test_under_nohup_sighup_still_reloads(models_file: Path) -> None:
    """nohup ignores SIGHUP (and takes the terminal away): kill -HUP then means a reload, as documented."""
    env = {"LAUNCHER_MODELS_FILE": str(models_file), "LAUNCHER_WATCH_MODELS_FILE": "0"}
    launcher = LauncherProcess(workload="standin", env=env, server=["nohup", sys.executable, "-m", "launcher"])
    try:
        models_file.write_text(models_file.read_text() + '  c: {options: "--model C"}\n')
        launcher.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "c" in names(launcher), 5, 0.05, "reloaded on SIGHUP under nohup")
    finally:
        launcher.stop()


def test_an_invalid_model_has_one_check_at_a_time_however_often_the_file_is_polled(tmp_path: Path) -> None:
    """The poll reads an unchanged file every second; a check of an invalid model that hangs (the
    forkserver restarting) must not be started again each time."""
    import asyncio

    from launcher.frontdoor.live_config import LiveConfig
    from launcher.frontdoor.model_state import ModelState
    from launcher.frontdoor.models_store import ModelsStore
    from launcher.frontdoor.profiles import ModelProfile

    path = tmp_path / "models.yaml"
    path.write_text('models:\n  a: {options: "--model A"}\n')
    state = ModelState(name="a", profile=ModelProfile(options="--model A"), invalid="no folder")

    class Door:  # the front door's side LiveConfig uses: its models and their (hanging) check
        checks = 0

        def states(self) -> list[ModelState]:
            return [state]

        async def check_runnable(self, _: ModelState) -> bool:
            Door.checks += 1
            await asyncio.sleep(3600)
            return False

    async def scenario() -> None:
        live = LiveConfig(Door(), ModelsStore(str(path)), path.read_text())  # type: ignore[arg-type]
        for why in ["changed"] * 10 + ["SIGHUP"] * 5:
            await live.reload(why=why)
        await asyncio.sleep(0)
        assert Door.checks == 1

    asyncio.run(scenario())
