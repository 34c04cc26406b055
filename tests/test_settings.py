"""Settings: every flag has a LAUNCHER_* twin; flags beat the environment."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from launcher.settings import Settings, unknown_variables
from tests.launcher_process import REPO


def test_defaults() -> None:
    settings = Settings.from_sources([], {})
    assert (settings.host, settings.port, settings.log_level) == ("0.0.0.0", 8001, "info")


def test_every_field_reads_its_environment_twin() -> None:
    samples = {"str": ("x", "x"), "int": ("7", 7), "float": ("2.5", 2.5), "bool": ("off", False)}
    for item in dataclasses.fields(Settings):
        raw, expected = samples[str(item.type)]
        value = getattr(Settings.from_sources(None, {"LAUNCHER_" + item.name.upper(): raw}), item.name)
        assert value == expected, item.name


def test_every_field_has_a_flag() -> None:
    for item in dataclasses.fields(Settings):
        name = item.name.replace("_", "-")
        if str(item.type) == "bool":
            assert getattr(Settings.from_sources([f"--no-{name}"], {}), item.name) is False
            assert getattr(Settings.from_sources([f"--{name}"], {f"LAUNCHER_{item.name.upper()}": "0"}), item.name)
            continue
        value = {"str": "y", "int": "9", "float": "1.5"}[str(item.type)]
        assert str(getattr(Settings.from_sources([f"--{name}", value], {}), item.name)) == value


def test_flag_beats_environment() -> None:
    settings = Settings.from_sources(["--port", "9000"], {"LAUNCHER_PORT": "9100", "LAUNCHER_LOG_DIR": "/x"})
    assert settings.port == 9000 and settings.log_dir == "/x"


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(SystemExit, match="LAUNCHER_PORT"):
        Settings.from_sources(None, {"LAUNCHER_PORT": "eighty"})


def test_an_unknown_launcher_variable_is_named_with_the_nearest_setting() -> None:
    warnings = unknown_variables({"LAUNCHER_MODEL_FILE": "m.yaml", "LAUNCHER_PORT": "1", "LAUNCHER_URL": "x",
                                  "LAUNCHER_TEST_TINY_MODEL": "t", "LAUNCHER_ZZZ": "1", "OTHER": "1"})  # fmt: skip
    assert warnings == [
        "LAUNCHER_MODEL_FILE is not a setting of the launcher (did you mean LAUNCHER_MODELS_FILE?): it is ignored",
        "LAUNCHER_ZZZ is not a setting of the launcher: it is ignored",
    ]


def test_the_launcher_warns_of_an_unknown_variable_and_says_did_you_mean_for_a_flag() -> None:
    env = {**os.environ, "LAUNCHER_MODEL_FILE": "m.yaml", "LAUNCHER_FORKSERVER_WORKLOAD": "standin"}
    done = subprocess.run([sys.executable, "-m", "launcher", "--model-file", "m.yaml"], env=env, capture_output=True,
                          text=True, timeout=60, check=False, cwd=REPO)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "launcher: warning: LAUNCHER_MODEL_FILE is not a setting of the launcher (did you mean "
        "LAUNCHER_MODELS_FILE?): it is ignored",
        "python -m launcher: unknown flag --model-file; did you mean --models-file? "
        "(python -m launcher --help lists the flags)",
    ]
