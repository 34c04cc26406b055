"""End open streams as soon as the server begins to shut down, whichever ASGI server runs the app.

uvicorn (and servers like it) wait for open responses to finish before they run the lifespan
shutdown, and a watch stream never finishes by itself: without this, ``uvicorn
launcher.app:app`` would wait forever on SIGTERM. The app chains a handler in front of the
server's own SIGTERM and SIGINT handlers; it schedules ``on_shutdown`` on the event loop and
then hands the signal on, so the server shuts down as it always does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _hand_on(previous: Any, signum: int, frame: FrameType | None) -> None:
    if callable(previous):
        previous(signum, frame)  # the server's handler (or asyncio's no-op: it reads the wakeup fd)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # nobody handles it: what the signal would have done


@contextlib.contextmanager
def on_shutdown_signals(on_shutdown: Callable[[], None]) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT also call ``on_shutdown`` (on the running loop)."""
    loop = asyncio.get_running_loop()
    installed: dict[int, Any] = {}

    def chained(signum: int, frame: FrameType | None) -> None:
        # A signal handler may run in the middle of the loop's own work: schedule, don't call.
        loop.call_soon_threadsafe(on_shutdown)
        _hand_on(installed.get(signum), signum, frame)

    for sig in SHUTDOWN_SIGNALS:
        previous = signal.getsignal(sig)
        if previous == signal.SIG_IGN:
            continue  # ignored on purpose by whoever started us
        try:
            signal.signal(sig, chained)
        except ValueError:
            break  # not the main thread: the server owns signals there
        installed[sig] = previous
    try:
        yield
    finally:
        for signum, previous in installed.items():
            if signal.getsignal(signum) is chained:
                signal.signal(signum, previous)
