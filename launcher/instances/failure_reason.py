"""One line that says why an instance stopped, read from the end of its log.

vLLM ends a failed start with a traceback, often two (the EngineCore's root cause, then the
API server's ``Engine core initialization failed. See root cause above``). The line wanted is
the root cause's ``ExceptionType: message``, without the traceback around it.
"""

from __future__ import annotations

import re

MAX_LENGTH = 500  # one line in a JSON answer, not a page
TAIL_BYTES = 65536  # enough for vLLM's two tracebacks

# vLLM's log prefix on lines from its processes: "(EngineCore pid=7) ERROR 12-01 11:29:10 [core.py:1510] ".
_PREFIX = re.compile(r"^\((?:\w+ )?pid=\d+\)\s*(?:[A-Z]+ \d\d-\d\d [\d:]+ \[[^\]]*\]\s?)?")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt))(?::\s*(.*))?$")
_PYDANTIC_HEADER = re.compile(r"^\d+ validation errors? for (\w+)$")
_PYDANTIC_SUFFIX = re.compile(r"\s*\[type=.*$")
# Wrappers that point elsewhere ("see root cause above"): the cause is the line wanted.
_GENERIC = ("See root cause above", "Engine core initialization failed", "Engine process failed to start")


def failure_reason(log_text: str) -> str | None:
    """The root cause's one line from a log's tail; its last line if no exception is in it."""
    lines = [_PREFIX.sub("", line).rstrip() for line in log_text.splitlines()]
    found: list[str] = []
    for index, line in enumerate(lines):
        match = _EXCEPTION.match(line)
        if match is None:
            continue
        name, message = match.group(1), (match.group(2) or "").strip()
        header = _PYDANTIC_HEADER.match(message)
        if header is not None:  # pydantic puts the message on the next, indented line
            detail = next((following.strip() for following in lines[index + 1 : index + 3] if following.strip()), "")
            detail = _PYDANTIC_SUFFIX.sub("", detail).removeprefix("Value error, ")
            message = f"{header.group(1)}: {detail}" if detail else message
        found.append(f"{name}: {message}" if message else name)
    specific = [line for line in found if not any(marker in line for marker in _GENERIC)]
    candidates = specific or found or [line.strip() for line in lines if line.strip()]
    if not candidates:
        return None
    chosen = candidates[-1]
    return chosen if len(chosen) <= MAX_LENGTH else chosen[: MAX_LENGTH - 1] + "…"


def read_failure_reason(log_path: str) -> str | None:
    """:func:`failure_reason` of the end of the file at ``log_path`` (None if unreadable)."""
    try:
        with open(log_path, "rb") as log_file:
            log_file.seek(0, 2)
            log_file.seek(max(0, log_file.tell() - TAIL_BYTES))
            tail = log_file.read()
    except OSError:
        return None
    return failure_reason(tail.decode(errors="replace"))
