"""Settings: every flag has a LAUNCHER_* twin; flags beat the environment."""

from __future__ import annotations

import dataclasses

import pytest

from launcher.settings import Settings


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
