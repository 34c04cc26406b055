"""Start-up phase markers an instance writes into its own log, for the start-latency benchmark.

A line looks like ``launcher: phase engine_ready at 1795730000.123456``: wall-clock time, so it
lines up with the API's and the forkserver's timestamps. Once vLLM's server runs, some releases
(0.26-0.28) prefix every line the process prints with ``(APIServer pid=N) ``; the reader
accepts that prefix.
"""

from __future__ import annotations

import re
import sys
import time

PREFIX = "launcher: phase"
LINE = re.compile(rb"^(?:\([^)\n]*\) )?launcher: phase (\w+) at ([0-9.]+)$", re.MULTILINE)


def mark(name: str, at: float | None = None) -> None:
    """Write the marker for phase ``name``, reached now or at wall-clock time ``at``."""
    print(f"{PREFIX} {name} at {time.time() if at is None else at:.6f}", file=sys.stdout, flush=True)


def read(log: bytes) -> dict[str, float]:
    """Every phase marker in a log, by name (first occurrence)."""
    found: dict[str, float] = {}
    for match in LINE.finditer(log):
        found.setdefault(match.group(1).decode(), float(match.group(2)))
    return found
