"""Model profiles: the models file's errors name the line and field; instances get the names."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.profiles import MODEL_ANNOTATION, ModelProfile, ProfileError, parse_models_file
from tests.launcher_process import REPO, free_port

GOOD = """\
idle_timeout: 120
models:
  tiny:
    options: "--model /models/tiny --max-model-len 256"
    aliases: [tiny-chat]
    idle_timeout: 0
  other:
    options: "--model /models/other"
    gpu_uuids: [GPU-0]
    share_gpu: true
"""


def test_a_good_file_parses() -> None:
    parsed = parse_models_file(GOOD)
    assert parsed.idle_timeout == 120
    assert parsed.models["tiny"].aliases == ["tiny-chat"] and parsed.models["tiny"].idle_timeout == 0
    assert parsed.models["other"].gpu_uuids == ["GPU-0"] and parsed.models["other"].share_gpu


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD.replace("idle_timeout: 0", "idle_timeout: -1"), "line 6, models.tiny.idle_timeout"),
        (GOOD.replace("    share_gpu: true", "    share_gpus: true"), "line 10, models.other.share_gpus"),
        (GOOD.replace('    options: "--model /models/other"\n', ""), "models.other.options: Field required"),
        (GOOD.replace("aliases: [tiny-chat]", "aliases: [other]"), "'other' is used by both 'tiny' and 'other'"),
        (GOOD.replace("models:", "models: [oops"), "line 3 column 7: not valid YAML"),
        ("- just\n- a list\n", "line 1: expected a mapping"),
        (GOOD.replace("aliases: [tiny-chat]", "aliases: ['two words']"), "line 5, models.tiny.aliases"),
    ],
)
def test_a_bad_file_names_the_line_and_field(text: str, expected: str) -> None:
    with pytest.raises(ProfileError) as caught:
        parse_models_file(text, source="models file m.yaml")
    assert str(caught.value).startswith("models file m.yaml")
    assert expected in str(caught.value)


def test_instance_config_adds_the_names_clients_use_unless_given() -> None:
    profile = ModelProfile(options="--model /m --max-model-len 256", aliases=["x y"[:1]], annotations={"team": "a"})
    config = profile.instance_config("tiny")
    assert shlex.split(config.options)[-5:] == ["--served-model-name", "tiny", "x", "--host", "127.0.0.1"]
    assert config.annotations == {"team": "a", MODEL_ANNOTATION: "tiny"}
    own = ModelProfile(options="--model /m --served-model-name=mine --host=::").instance_config("tiny")
    assert own.options == "--model /m --served-model-name=mine --host=::"  # both given: nothing added


def test_the_launcher_refuses_to_start_with_a_bad_models_file(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(GOOD.replace("idle_timeout: 0", "idle_timeout: soon"))
    result = subprocess.run(
        [sys.executable, "-m", "launcher", "--port", str(free_port()), "--models-file", str(models)],
        cwd=REPO, env={**os.environ, "LAUNCHER_FORKSERVER_WORKLOAD": "standin"}, check=False,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"models file {models}: line 6, models.tiny.idle_timeout" in result.stderr
