"""A ``--model`` that names a local path must be a model there, before anything is forked.

vLLM treats a path that does not exist as a model hub id and fails in the instance, after the
fork, with ``Repo id must be in the form 'repo_name' or 'namespace/repo_name'``: nothing says
"no such directory". The check here says so at create time.

It runs in the forkserver, as the user the instances run as: a model that user cannot read
(a container run under an arbitrary UID, OpenShift's, with weights written mode 0600) is
"permission denied" naming the file, where vLLM would fail in the instance with a misleading
``FileNotFoundError`` for the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

# What vLLM can load from a directory: a Hugging Face layout (config.json) or a GGUF file.
_MARKER = "config.json"
_GGUF = ".gguf"


def is_local_path(model: str) -> bool:
    """True if ``model`` is written as a path (absolute, ``./``, ``../`` or ``~``), not a hub id."""
    return model.startswith(("/", "./", "../", "~")) or model in (".", "..")


def expand(model: str) -> str:
    """``~`` expanded as a shell would (vLLM does not, and the options never pass a shell)."""
    return os.path.expanduser(model) if model.startswith("~") else model


def _denied(shown: str, path: Path | str) -> str:
    return f"{shown}: permission denied: {path} is not readable by the launcher's user (uid {os.getuid()})"


def _unreadable_file(directory: Path) -> Path | None:
    """The first file in ``directory`` (not in its subfolders) this process cannot read."""
    for entry in sorted(directory.iterdir()):
        if not entry.name.startswith(".") and entry.is_file() and not os.access(entry, os.R_OK):
            return entry
    return None


def local_model_problem(model: str) -> str | None:
    """Why the local path ``model`` cannot be loaded by vLLM; None if it can or is not a path."""
    if not is_local_path(model):
        return None
    path = Path(expand(model))
    shown = f"--model {model}" + (f" ({path})" if str(path) != model else "")
    try:
        if not path.exists():
            return f"{shown}: no such file or directory on this node"
        if path.is_file():
            if not os.access(path, os.R_OK):
                return _denied(shown, path)
            if path.suffix.lower() == _GGUF:
                return None
            return f"{shown} is a file, not a model: give the model's directory (with {_MARKER}) or a {_GGUF} file"
        if not os.access(path, os.R_OK | os.X_OK):
            return _denied(shown, path)
        if (path / _MARKER).is_file() or any(entry.suffix.lower() == _GGUF for entry in path.iterdir()):
            unreadable = _unreadable_file(path)
            return None if unreadable is None else _denied(shown, unreadable)
    except PermissionError as exc:  # a folder on the way that this user may not enter
        return _denied(shown, exc.filename or path)
    except OSError as exc:
        return f"{shown}: cannot be read: {exc.strerror or exc}"
    return f"{shown} is not a model directory: it has no {_MARKER} (nor a {_GGUF} file)"
