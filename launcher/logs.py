"""The launcher's own log lines, beside uvicorn's: one line per thing that happens to an instance
or a model (created, ready with its phases, stopped and why, idle stops, evictions, adoptions,
reloads), in uvicorn's format and at ``--log-level``.

uvicorn configures only its own loggers; without this, the ``launcher`` loggers' info lines went
nowhere (Python's last-resort handler shows warnings only).
"""

from __future__ import annotations

import logging
import sys

LOGGER = "launcher"


def configure(level: str) -> None:
    """Send the ``launcher.*`` loggers to stderr at ``level`` (once; a handler set up by the user stays)."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level.upper())
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    try:
        from uvicorn.logging import DefaultFormatter  # "INFO:     ..." like uvicorn's own lines

        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s", use_colors=None))
    except ImportError:  # another ASGI server
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
