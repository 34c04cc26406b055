"""vLLM's model inspection, in a fork of the instance instead of a new Python.

The first time vLLM meets a model architecture (per vLLM build: the cache in
``$VLLM_CACHE_ROOT/modelinfos`` is keyed by a hash of the model's module), its registry inspects
the model class in ``python -m vllm.model_executor.models.registry``, a fresh interpreter that
imports vLLM and torch from scratch "to avoid initializing CUDA" in the server process. That
is a cold start on the start path: 14 s on this 2-CPU machine, 21 s on an H100 host, paid by
the first instance of each architecture on every new machine, container or vLLM upgrade.

In an instance vLLM is already imported, so :func:`run_in_fork` runs the same function in a
fork of the instance's API process instead: the child shares every imported module, imports
the model module if it is not preloaded, inspects, sends the result back through a pipe and
leaves with ``os._exit``. Whatever the inspection imports or initialises (CUDA included) stays
in that child, as it did in vLLM's subprocess; the registry then writes its cache as usual.
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

from forkserver import phases

T = TypeVar("T")


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _child(fn: Callable[[], object], write_fd: int, before: Callable[[], None] | None) -> None:
    code = 0
    try:
        if before is not None:
            before()
        payload = pickle.dumps((True, fn()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        payload = pickle.dumps((False, traceback.format_exc()))
        code = 1
    try:
        _write_all(write_fd, payload)
    finally:
        os._exit(code)


def run_in_fork(fn: Callable[[], T], before: Callable[[], None] | None = None) -> T:
    """Run ``fn`` in a forked child and return its (pickled) result; raise if it raised.

    ``before`` runs first in the child (vLLM loads its plugins there, as its subprocess does).
    The error has the same form as vLLM's subprocess runner: ``RuntimeError`` with the child's
    traceback.
    """
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(fn, write_fd, before)
    os.close(write_fd)
    try:
        payload = _read_all(read_fd)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    phases.mark("model_inspected")
    if not payload:
        raise RuntimeError("Error raised in subprocess:\nthe model-inspection fork died without an answer")
    ok, value = pickle.loads(payload)
    if not ok:
        raise RuntimeError(f"Error raised in subprocess:\n{value}")
    result: T = value
    return result
