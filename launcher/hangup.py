"""``SIGHUP``: reload the models file, unless it means that the launcher's terminal closed.

A launcher run as a service (Kubernetes, systemd: no terminal) takes ``kill -HUP`` as "read the
models file again", as daemons do. One started in a terminal (``make run``) gets ``SIGHUP`` when
that terminal closes: it says so and shuts down cleanly (its instances stopped, its runtime
directory removed), as Ctrl-C would. Under ``nohup`` (SIGHUP ignored, no terminal) ``kill -HUP``
reloads; ignored on a terminal, it stays ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

log = logging.getLogger("launcher")


def _on_a_terminal() -> bool:
    with contextlib.suppress(ValueError, OSError):
        return sys.stdin is not None and os.isatty(sys.stdin.fileno())
    return False


_early: list[int] = []  # hang-ups before the app could act on them (python -m launcher's start-up)


def _held_for_later(signum: int, frame: FrameType | None) -> None:
    _early.append(signum)


def hold_early() -> None:
    """From now until the app handles it, a SIGHUP is noted, not fatal (``python -m launcher``
    calls this first: vLLM's preload takes seconds, and a hang-up then must not kill it silently)."""
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN or not _on_a_terminal():
        signal.signal(signal.SIGHUP, _held_for_later)


@contextlib.contextmanager
def on_hangup(reload: Callable[[], None]) -> Iterator[None]:
    """While inside, SIGHUP calls ``reload`` on the running loop (or, on a terminal, shuts down);
    after it (the shutdown), a SIGHUP is held, never fatal: the clean-up runs to its end."""
    loop = asyncio.get_running_loop()
    previous: Any = signal.getsignal(signal.SIGHUP)
    terminal = _on_a_terminal()
    if previous == signal.SIG_IGN and terminal:  # ignored on a terminal: whoever started it wants it so
        yield
        return
    # Ignored without a terminal (nohup): a hang-up cannot come, so kill -HUP means a reload.

    def hang_up() -> None:
        if terminal:
            log.warning("the terminal closed (SIGHUP): shutting down (kill -HUP reloads the models file only "
                        "when the launcher runs without a terminal; POST /v2/vllm/models/reload always does)")
            os.kill(os.getpid(), signal.SIGTERM)  # the shutdown every stop takes
        else:
            log.info("SIGHUP: reading the models file again")
            reload()

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(hang_up)  # never work in a signal handler

    try:
        signal.signal(signal.SIGHUP, handler)
    except ValueError:  # not the main thread: the server owns signals there
        yield
        return
    if _early:  # a hang-up during start-up, acted on now
        _early.clear()
        loop.call_soon(hang_up)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGHUP) is handler:
            signal.signal(signal.SIGHUP, _held_for_later)  # shutting down: a hang-up now must not cut the clean-up
