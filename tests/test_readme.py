"""The README's Quick start and front-door example, and the client page's example, run as written
against a real launcher.

The commands are read from README.md, not copied here, so the two cannot drift apart. They run
in a scratch directory laid out like a checkout (``.tiny-model`` and ``.venv`` are links to the
test's model and this Python's environment), so ``$PWD/.tiny-model`` and
``.venv/bin/launcherctl`` work unchanged. Only what a shared machine forces is changed: the
ports (8001, 8000) become free ones, and ``make ...`` lines are the launcher this test starts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import real_vllm_launcher
from tests.launcher_process import REPO, LauncherProcess, free_port

pytestmark = pytest.mark.vllm

README = (REPO / "README.md").read_text(encoding="utf-8")
API_PORT, INSTANCE_PORT = "8001", "8000"  # as the README writes them


def section(title: str) -> str:
    """The README's text from the ``## title`` heading to the next one."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end >= 0 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


@dataclass
class Command:
    """One shell command of a block (continuation lines joined), its comment and sample answer."""

    text: str
    comment: str = ""
    sample: str = ""  # a ``# {...}`` line after the command: the answer's shape


def commands(block: str) -> list[Command]:
    found: list[Command] = []
    pending = ""
    for line in block.splitlines():
        if not pending and line.startswith("# {"):
            found[-1].sample = line[2:]
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if not line.strip():
            continue
        text, _, comment = line.partition("  # ")  # the README's comments follow two spaces
        found.append(Command(text.strip(), comment.strip()))
    return found


@dataclass
class Scene:
    """The scratch checkout, the launcher, and how to run a README command against it."""

    workdir: Path
    launcher: LauncherProcess
    instance_port: int

    def run(self, command: Command, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        text = command.text.replace(f"localhost:{API_PORT}", f"127.0.0.1:{self.launcher.port}")
        text = text.replace(f"localhost:{INSTANCE_PORT}", f"127.0.0.1:{self.instance_port}")
        text = text.replace(f"--port {INSTANCE_PORT}", f"--port {self.instance_port}")
        env = {key: value for key, value in os.environ.items() if not key.startswith("LAUNCHER_")}
        env["LAUNCHER_URL"] = self.launcher.base_url  # what the CLI lines talk to
        return subprocess.run(
            ["bash", "-c", text], cwd=self.workdir, env=env, capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Scene]:
    workdir = tmp_path_factory.mktemp("readme")
    (workdir / ".tiny-model").symlink_to(tiny_model)
    (workdir / ".venv").symlink_to(sys.prefix)
    # The front-door section's models file, made by its own printf line.
    [front_door_shell] = code_blocks(section("On-demand serving: the OpenAI-compatible front door"), "bash")
    [printf] = [command for command in commands(front_door_shell) if command.text.startswith("printf ")]
    made = subprocess.run(["bash", "-c", printf.text], cwd=workdir, capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stderr
    assert "--models-file models.yaml" in front_door_shell
    with real_vllm_launcher(LAUNCHER_MODELS_FILE=str(workdir / "models.yaml")) as launcher:
        yield Scene(workdir, launcher, free_port())


def test_the_quick_start_runs_as_written(scene: Scene) -> None:
    blocks = code_blocks(section("Quick start"), "bash")
    assert len(blocks) == 2, "the Quick start has its curl block and its CLI block"
    steps = commands(blocks[0])
    assert [step.text for step in steps[:2]] == ["make tiny-model", "make run &"]  # this test's launcher
    for step in steps[2:]:
        if "/watch" in step.text:  # a stream until Ctrl-C: read what it replays, then stop it
            done = scene.run(Command(f"timeout 5 {step.text}"))
            assert done.returncode == 124, done.stderr
            events = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
            assert [event["type"] for event in events][:2] == ["CREATED", "READY"], events
            continue
        done = scene.run(step)
        assert done.returncode == 0, f"{step.text}\n{done.stdout}\n{done.stderr}"
        if not done.stdout.lstrip().startswith("{"):
            continue
        answer = json.loads(done.stdout)
        assert "detail" not in answer and "error" not in answer, (step.text, answer)
        if step.sample:  # the sample answer has the real one's fields, no more, no fewer
            assert set(json.loads(step.sample)) == set(answer), (step.sample, answer)
        listed = re.fullmatch(r"([a-z_]+(?:, [a-z_]+)*)(?:, \.\.\.)?", step.comment)
        if listed:  # "status, ready, start_seconds, ...": fields the answer has
            assert set(listed.group(1).split(", ")) <= set(answer), (step.comment, answer)
    assert scene.launcher.client.get("/v2/vllm/instances/tiny").status_code == 404  # the DELETE ran

    cli = commands(blocks[1])
    assert [step.text.split()[:2] for step in cli] == [
        [".venv/bin/launcherctl", "create"], [".venv/bin/launcherctl", "list"], [".venv/bin/launcherctl", "delete"]
    ]  # fmt: skip
    created = scene.run(cli[0])
    assert created.returncode == 0, created.stderr
    assert re.search(r"http://[^\s]+:\d+", created.stdout), created.stdout  # the URL, once ready
    options = scene.launcher.client.get("/v2/vllm/instances/tiny2").json()["options"]
    assert "\n" not in options and options.endswith("--kv-cache-memory-bytes 32M")  # one line, as typed
    listed = scene.run(cli[1])
    assert listed.returncode == 0 and "tiny2" in listed.stdout, listed.stdout
    assert scene.run(cli[2]).returncode == 0
    assert scene.launcher.client.get("/v2/vllm/instances/tiny2").status_code == 404


def test_the_front_door_example_runs_as_written(scene: Scene) -> None:
    [snippet] = code_blocks(section("On-demand serving: the OpenAI-compatible front door"), "python")
    assert f"http://localhost:{API_PORT}/v1" in snippet
    script = snippet.replace(f"localhost:{API_PORT}", f"127.0.0.1:{scene.launcher.port}")
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=scene.workdir, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "['tiny', 'tiny-chat']"  # as its comment says
    assert len(lines) >= 3 and lines[1].strip() and lines[2].strip(), lines  # the chat reply, then the stream


def test_the_client_example_runs_as_written(scene: Scene) -> None:
    [snippet] = code_blocks((REPO / "docs" / "client.md").read_text(encoding="utf-8"), "python")
    env = {key: value for key, value in os.environ.items() if not key.startswith("LAUNCHER_")}
    env["LAUNCHER_URL"] = scene.launcher.base_url
    done = subprocess.run([sys.executable, "-c", snippet], cwd=scene.workdir, env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"\d+ [0-9.]+", lines[0]), lines  # port, start seconds
    assert "READY opt" in lines and scene.launcher.client.get("/v2/vllm/instances/opt").status_code == 404
