"""The models file written back by the API (launcher/frontdoor/models_store.py), on real files.

What is written reads back as the same profiles (the reader is YAML 1.1, the writer 1.2), an
anchored entry is replaced rather than edited (its other users keep theirs), the last model can
be removed from a file whose ``models:`` has a comment, and a file that is a mount point of its
own is written in place.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from launcher.frontdoor.models_store import ModelsStore
from launcher.frontdoor.profiles import ModelProfile, ProfileError, load_models_file, parse_models_file


def test_strings_yaml_11_would_misread_are_quoted(tmp_path: Path) -> None:
    odd = ["on", "off", "yes", "No", "1:30", "1e3", "0x10", "null", "~", "true", "2026-12-06", "012"]
    profile = ModelProfile(options="--model m", aliases=[f"a-{word}" for word in odd] + odd[:2],
                           env_vars={f"K{index}": word for index, word in enumerate(odd)})  # fmt: skip
    path = tmp_path / "models.yaml"
    store = ModelsStore(str(path))
    store.put("m", profile)
    store.put("yes", ModelProfile(options="--model y"))
    models = load_models_file(str(path)).models
    assert models["m"] == profile and "yes" in models


def test_an_anchored_entry_is_replaced_and_its_other_users_keep_theirs(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        "  a: &base {options: --model A, idle_timeout: 60}\n"
        "  b: {<<: *base, aliases: [bee]}\n"
        "  c: *base\n"
    )
    store = ModelsStore(str(path))
    store.put("a", ModelProfile(options="--model A2"))
    models = load_models_file(str(path)).models
    assert models["a"] == ModelProfile(options="--model A2")
    assert models["c"] == ModelProfile(options="--model A", idle_timeout=60)
    assert models["b"] == ModelProfile(options="--model A", idle_timeout=60, aliases=["bee"])
    store.put("b", ModelProfile(options="--model B2"))
    assert load_models_file(str(path)).models["b"] == ModelProfile(options="--model B2")


def test_the_last_model_can_be_removed_when_models_has_a_comment(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("# node models\nmodels:   # the ones we serve\n  a: {options: --model A}\n")
    ModelsStore(str(path)).remove("a")
    text = path.read_text()
    assert parse_models_file(text).models == {} and "# node models" in text, text


def test_a_file_that_is_a_mount_point_is_written_in_place(tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    source, target = tmp_path / "source.yaml", tmp_path / "mounted.yaml"
    source.write_text("models: {}\n")
    target.write_text("")
    script = (
        "import sys; from launcher.frontdoor.models_store import ModelsStore; "
        "from launcher.frontdoor.profiles import ModelProfile; "
        f"ModelsStore({str(target)!r}).put('x', ModelProfile(options='--model X'))"
    )
    done = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind {source} {target} && "
                           f"{shutil.which('python3') and __import__('sys').executable} -c \"{script}\""],
                          capture_output=True, text=True, timeout=60, check=False, cwd=Path(__file__).parent.parent)  # fmt: skip
    if done.returncode != 0 and "mount" in done.stderr and "x:" not in source.read_text():
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    assert "x:" in source.read_text()  # through the mount: the mounted file itself was written


def test_duplicate_keys_are_an_error_with_the_line(tmp_path: Path) -> None:
    text = "models:\n  a: {options: --model A}\n  b: {options: --model B}\n  a: {options: --model A-big}\n"
    with pytest.raises(ProfileError, match=r"line 4.*'a' is given twice"):
        parse_models_file(text)
