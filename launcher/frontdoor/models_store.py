"""The models file on disk: read it, and write the API's changes back into it.

The file is the truth while the launcher runs: ``PUT`` and ``DELETE /v2/vllm/models/NAME``
(``launcherctl models add/remove``) change it, and a change made by hand is reloaded
(:mod:`launcher.frontdoor.reload`). A change is written atomically (a temporary file beside it,
fsync, rename), round-trip (ruamel.yaml: the user's comments, order and layout stay; only the
profile changed is written anew), into the file a symlink points at (a user's dotfiles link is
kept a link). A file that cannot be written (a read-only mount, a Kubernetes ConfigMap) refuses
the change: :class:`ReadOnly`, answered 409, and nothing changes.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any, cast

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from launcher.frontdoor.profiles import ModelProfile, ModelsFile, ProfileError, load_models_file, parse_models_file

NOT_KEPT = (
    "not kept across restarts: the launcher has no models file (start it with --models-file PATH; "
    "the file is created when a model is added)"
)


class ReadOnly(Exception):
    """The models file cannot be written; the message says which and why."""


def _yaml() -> YAML:
    yaml = YAML()  # round-trip: comments, order, quotes and flow style are kept
    yaml.preserve_quotes = True
    yaml.width = 4096  # long options stay on one line
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def profile_data(profile: ModelProfile) -> dict[str, Any]:
    """What a profile writes into the file: the fields set, defaults left out."""
    return cast(dict[str, Any], _read_back_alike(profile.model_dump(exclude_defaults=True, exclude_none=True)))


def _read_back_alike(value: Any) -> Any:
    """``value`` with every string the file's reader (PyYAML, YAML 1.1) would read as something else
    quoted: ``on``, ``off``, ``yes``, ``no``, ``1:30``, ``1e3``... ruamel writes YAML 1.2, where they are strings."""
    if isinstance(value, dict):
        return {_read_back_alike(key): _read_back_alike(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_read_back_alike(item) for item in value]
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same else DoubleQuotedScalarString(value)
    return value


class ModelsStore:
    """The ``--models-file`` (``path`` empty: none; changes then last until a restart)."""

    def __init__(self, path: str) -> None:
        self.path = path

    @property
    def kept(self) -> bool:
        """Whether changes are written to a file."""
        return bool(self.path)

    def exists(self) -> bool:
        """Whether the file is there (a models file named but not made yet is created on the first change)."""
        return bool(self.path) and os.path.exists(self.path)

    def read_text(self) -> str | None:
        """The file's text (None when it does not exist); :class:`ProfileError` if it cannot be read."""
        try:
            return Path(self.path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileError(f"cannot read models file {self.path}: {exc}") from None

    def load(self) -> ModelsFile:
        """The file parsed (no file: no profiles); :class:`ProfileError` names the line."""
        if not self.path or not os.path.exists(self.path):
            return ModelsFile()
        return load_models_file(self.path)

    def put(self, name: str, profile: ModelProfile) -> str | None:
        """Write ``profile`` under ``name`` (replacing the one there, in its place); the new text."""
        return self._change(lambda models: _set(models, name, profile_data(profile)))

    def remove(self, name: str) -> str | None:
        """Remove the profile ``name`` from the file (if there); the new text."""
        return self._change(lambda models: models.pop(name, None))

    def _empty_models(self, data: Any) -> None:
        """``models:`` with no profile left is written ``models: {}`` (its comment kept above it)."""
        if isinstance(data.get("models"), dict) and not data["models"]:
            data["models"] = CommentedMap()
            data["models"].fa.set_flow_style()
            comment = data.ca.items.pop("models", None)
            if comment is not None and isinstance(data, CommentedMap):
                text = " ".join(token.value.strip() for token in comment if token is not None and hasattr(token, "value"))
                if text:
                    data.yaml_set_comment_before_after_key("models", before=text.lstrip("# "))

    def _change(self, edit: Any) -> str | None:
        if not self.path:
            return None
        target = os.path.realpath(self.path)  # a symlink stays a symlink: its file is changed
        yaml = _yaml()
        try:
            text = Path(target).read_text(encoding="utf-8")
        except FileNotFoundError:
            text = ""
        except (OSError, UnicodeDecodeError) as exc:
            raise ReadOnly(f"cannot read the models file {self.path}: {exc}") from None
        try:
            data = yaml.load(text) if text.strip() else None
        except YAMLError as exc:
            raise ReadOnly(f"the models file {self.path} is not valid YAML now ({exc}); fix it first") from None
        if data is None:
            data = CommentedMap()
        if not isinstance(data, dict):
            raise ReadOnly(f"the models file {self.path} is not a mapping with 'models'; fix it first")
        if not isinstance(data.get("models"), dict):
            data["models"] = CommentedMap()
        try:
            edit(data["models"])
            self._empty_models(data)
            out = io.StringIO()
            yaml.dump(data, out)
        except Exception as exc:  # noqa: BLE001 - ruamel on a construct it cannot edit: refused, file untouched
            raise ReadOnly(f"the models file {self.path} could not be changed ({type(exc).__name__}: {exc}); "
                           "change it by hand") from None  # fmt: skip
        new_text = out.getvalue()
        parse_models_file(new_text, source=f"models file {self.path}")  # never write what could not be read back
        _write_atomically(target, new_text, display=self.path)
        return new_text


def _set(models: Any, name: str, data: dict[str, Any]) -> None:
    """Set ``models[name]``, keeping the comments of an existing entry's fields that stay."""
    existing = models.get(name)
    shared = isinstance(existing, CommentedMap) and (existing.anchor.value is not None or bool(existing.merge))
    if isinstance(existing, CommentedMap) and not shared:  # an anchored or merged entry is replaced: never edited
        for key in [key for key in existing if key not in data]:
            del existing[key]
        for key, value in data.items():
            if existing.get(key) != value:
                existing[key] = value
        return
    models[_read_back_alike(name)] = CommentedMap(data)  # a name such as "yes" quoted, or it reads back as True


def _write_atomically(path: str, text: str, *, display: str) -> None:
    """Write ``text`` to ``path`` whole or not at all; :class:`ReadOnly` when the folder or file refuses."""
    folder = os.path.dirname(path) or "."
    mode = 0o644
    with contextlib.suppress(OSError):
        mode = os.stat(path).st_mode & 0o7777
        if not mode & 0o222 or not os.access(path, os.W_OK):  # no write bit: read-only on purpose, even to root
            raise ReadOnly(f"the models file {display} is read-only: change it where it comes from, or make it "
                           "writable (chmod u+w)")  # fmt: skip
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".models-", suffix=".yaml", dir=folder)
    except OSError as exc:
        raise ReadOnly(f"the models file {display} cannot be written ({exc.strerror or exc}): change it where it "
                       "comes from (a read-only mount, a ConfigMap), or give --models-file a writable path") from None  # fmt: skip
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        try:
            os.replace(temporary, path)
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.EXDEV):
                raise
            # A file mounted on its own (docker -v file:..., a Kubernetes subPath) cannot be renamed
            # over: it is written in place instead (whole, but not atomically).
            os.unlink(temporary)
            with open(path, "r+", encoding="utf-8") as file:
                file.write(text)
                file.truncate()
                file.flush()
                os.fsync(file.fileno())
            return
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise ReadOnly(f"the models file {display} cannot be written: {exc.strerror or exc}") from None
