"""Defects an outside review reproduced on the API and its files, each on real processes or real files.

The token check and the index read the same ``Accept``; a name cannot end in a newline (nor hold
any control character); one bad entry in the footprints file is skipped, not fatal; two
launchers never both hold a log directory.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkserver.protocol import valid_instance_id
from launcher.frontdoor.profiles import check_name
from launcher.instances import dir_lock
from tests.launcher_process import LauncherProcess
from tests.test_front_door_standin import ask, front_door

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def secured() -> Iterator[LauncherProcess]:
    launcher = LauncherProcess(workload="standin", env={"LAUNCHER_API_TOKEN": TOKEN})
    try:
        yield launcher
    finally:
        launcher.stop()


@pytest.mark.parametrize(
    "accept",
    [
        [("accept", "application/json"), ("accept", "text/html")],
        [("accept", "text/html"), ("accept", "application/json")],
        [("accept", "application/json, text/html")],
        [("accept", "text/html")],
    ],
)
def test_without_the_token_the_index_only_redirects_a_browser(
    secured: LauncherProcess, accept: list[tuple[str, str]]
) -> None:
    answer = secured.client.get("/", headers=accept, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/ui", answer.text
    assert "endpoints" not in answer.text


def test_without_the_token_the_index_is_refused_to_an_api_client(secured: LauncherProcess) -> None:
    assert secured.client.get("/", headers={"accept": "application/json"}).status_code == 401
    authorized = secured.client.get("/", headers={"accept": "application/json", "authorization": f"Bearer {TOKEN}"})
    assert authorized.status_code == 200 and "endpoints" in authorized.json()


def test_two_authorization_headers_are_refused(secured: LauncherProcess) -> None:
    headers = [("authorization", "Bearer wrong"), ("authorization", f"Bearer {TOKEN}")]
    assert secured.client.get("/v2/vllm/instances", headers=headers).status_code == 401
    headers.reverse()
    assert secured.client.get("/v2/vllm/instances", headers=headers).status_code == 401


def test_a_model_name_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    with front_door(tmp_path, "models: {}\n") as launcher:
        for name in ("tiny%0A", "tiny%0D", "tiny%C2%85", "ti%09ny"):
            answer = launcher.client.put(f"/v2/vllm/models/{name}", json={"options": "--model T"})
            assert answer.status_code in (400, 422), (name, answer.status_code, answer.text)
            assert "is not a model name" in answer.text
        assert launcher.client.get("/v1/models").json()["data"] == []
        assert launcher.client.put("/v2/vllm/models/tiny", json={"options": "--model T"}).status_code == 201
        answer = launcher.client.put("/v2/vllm/models/x", json={"options": "--model X", "aliases": ["al\n"]})
        assert answer.status_code in (400, 422) and "is not a model name" in answer.text


CONTROL = st.characters(categories=["Cc", "Cf", "Zl", "Zp"]) | st.sampled_from("\n\r\t\x0b\x0c\x85\u2028 ")


@given(st.text(min_size=0, max_size=20), CONTROL, st.text(min_size=0, max_size=20))
def test_no_name_or_instance_id_holds_a_control_character_or_a_space(before: str, bad: str, after: str) -> None:
    name = before + bad + after
    with pytest.raises(ValueError, match="is not a model name"):
        check_name(name)
    assert not valid_instance_id(name)


def test_one_bad_footprints_entry_is_skipped_and_named(tmp_path: Path) -> None:
    footprints = tmp_path / "footprints.json"
    good = {"model": "m", "host_bytes": 600 * 2**20, "overhead": 500 * 2**20}
    footprints.write_text(json.dumps({"x": {"overhead": None}, "y": {"host_bytes": "3"}, "z": 5, "good": good}))
    with front_door(tmp_path, 'models:\n  m: {options: "--model M"}\n',
                    LAUNCHER_FOOTPRINTS_FILE=str(footprints)) as launcher:  # fmt: skip
        assert launcher.client.get("/health").status_code == 200
        assert ask(launcher, "m").status_code == 200
        output = launcher.output_text()
        assert "skipping 3 unusable entries" in output and "'x'" in output and "'z'" in output


def test_a_launcher_that_opened_the_lock_file_as_it_was_released_locks_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holds the directory; B opens the lock file; A releases (unlinks, closes); B locks; C starts.

    B's lock was on a file no longer in the directory, so C could lock a new one beside it: B
    must notice and lock the file the path names, so that C is refused.
    """
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / dir_lock.LOCK_FILE
    a = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(a, fcntl.LOCK_EX)
    real_flock = fcntl.flock
    calls = []

    def a_releases_first(fd: int, operation: int) -> None:
        if not calls:  # B has the file open: A lets go now, as dir_lock.release does
            os.unlink(path)
            os.close(a)
        calls.append(fd)
        real_flock(fd, operation)

    monkeypatch.setattr(dir_lock.fcntl, "flock", a_releases_first)
    dir_lock.lock(str(directory))  # B
    monkeypatch.setattr(dir_lock.fcntl, "flock", real_flock)
    try:
        c = os.open(path, os.O_RDWR | os.O_CREAT)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(c, fcntl.LOCK_EX | fcntl.LOCK_NB)  # C
        finally:
            os.close(c)
        assert len(calls) == 2  # B looked again, and locked the file the path names
    finally:
        dir_lock.release(str(directory))


def test_a_launcher_locking_as_another_removes_the_default_directory_makes_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "state" / "logs"
    real_open = os.open
    removed = []

    def open_after_removal(path: str, flags: int, mode: int = 0o777) -> int:
        if not removed:  # another launcher's release(remove_empty=...) runs between makedirs and open
            removed.append(path)
            os.rmdir(directory)
            os.rmdir(directory.parent)
        return real_open(path, flags, mode)

    monkeypatch.setattr(dir_lock.os, "open", open_after_removal)
    dir_lock.lock(str(directory))
    monkeypatch.setattr(dir_lock.os, "open", real_open)
    try:
        assert removed and (directory / dir_lock.LOCK_FILE).exists()
    finally:
        dir_lock.release(str(directory))


def test_a_footprints_file_nested_too_deeply_is_ignored_not_fatal(tmp_path: Path) -> None:
    footprints = tmp_path / "footprints.json"
    footprints.write_text("[" * 100_000 + "]" * 100_000)
    with front_door(tmp_path, 'models:\n  m: {options: "--model M"}\n',
                    LAUNCHER_FOOTPRINTS_FILE=str(footprints)) as launcher:  # fmt: skip
        assert ask(launcher, "m").status_code == 200
        assert "ignoring the measured footprints" in launcher.output_text()
