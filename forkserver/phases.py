"""Start-up phase markers an instance writes into its own log, for the start-latency benchmark.

A line looks like ``launcher: phase engine_ready at 1795730000.123456``: wall-clock time, so it
lines up with the API's and the forkserver's timestamps. A phase that may happen more than once
(vLLM compiles each compiled module, and retries a failed cache load) writes ``<name>_start``
and ``<name>_done`` each time: the first start and the last done count. Once vLLM's server runs, some releases
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
    """Every phase marker in a log, by name: the first occurrence, the last for ``*_done``."""
    found: dict[str, float] = {}
    for match in LINE.finditer(log):
        name, at = match.group(1).decode(), float(match.group(2))
        if name.endswith("_done"):
            found[name] = at
        else:
            found.setdefault(name, at)
    return found


def _span(marks: dict[str, float], name: str) -> float:
    start, done = marks.get(f"{name}_start"), marks.get(f"{name}_done")
    return max(0.0, done - start) if start is not None and done is not None else 0.0


def start_phases(marks: dict[str, float], *, received_at: float, ready_at: float) -> dict[str, float] | None:
    """Where a start's seconds went, from its markers; None if the workload wrote none.

    ``parse`` (request to options parsed), ``fork`` (to the child running), ``engine_init``
    (to vLLM's engine up, less the next three), ``load`` (the model's weights: read and
    post-processed by vLLM, or taken from a zygote, plus any wait for a zygote to load them),
    ``compile`` (torch.compile, or loading its artifact), ``graphs`` (CUDA graph capture),
    ``ready`` (engine up to the first healthy answer). Phases that did not happen (no compile
    in eager mode, no graphs on CPU) are 0. Where the load is timed, ``weights_shared`` is 1.0
    when the weights came from a zygote (shared with the model's other instances), else 0.0.
    """
    if "child_ready" not in marks or "engine_ready" not in marks:
        return None
    parsed = marks.get("options_parsed", received_at)
    compile_s, graphs_s = _span(marks, "compile"), _span(marks, "graphs")
    waited_s, load_s = _span(marks, "load_wait"), _span(marks, "load")  # before the fork; in the engine
    engine_s = marks["engine_ready"] - marks["child_ready"]
    result = {
        "parse": parsed - received_at,
        "fork": marks["child_ready"] - parsed - waited_s,
        "engine_init": engine_s - compile_s - graphs_s - load_s,
    }
    if "load_start" in marks or "load_wait_start" in marks:
        result["load"] = waited_s + load_s
    result.update({"compile": compile_s, "graphs": graphs_s, "ready": ready_at - marks["engine_ready"]})
    rounded = {name: round(max(0.0, seconds), 3) for name, seconds in result.items()}
    if "load" in result:
        rounded["weights_shared"] = 1.0 if "weights_shared" in marks else 0.0
    return rounded
