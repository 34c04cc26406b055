"""The log endpoint's Range rules, exactly as the original document states them.

- No ``Range``: 200 with bytes ``[0, min(total, cap))`` (and, as FMA's launcher, a
  ``Content-Range`` when there are any).
- ``bytes=START-``: 206 with at most ``cap`` (1 MiB) bytes from START and
  ``Content-Range: bytes S-E/TOTAL``.
- ``bytes=START-END`` (inclusive): 206 with the bytes asked for; the document sets no limit
  there, this launcher a sane one, ``RANGE_CAP`` (64 MiB), so one answer never holds a whole
  runaway log in memory.
- START at or past the end: 416 with ``Content-Range: bytes */TOTAL`` and an empty body.
- Suffix ranges (``bytes=-N``), several ranges, other units, END < START, or anything else
  malformed: 400.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from launcher.errors import BadRequest, RangeNotSatisfiable

LOG_CAP = 1 << 20  # 1 MiB: no Range, or an open-ended one
RANGE_CAP = 64 << 20  # 64 MiB: an explicit bytes=START-END
_RANGE = re.compile(r"^bytes=([0-9]{1,18})-([0-9]{0,18})$")  # 18 digits: far past any log, still an int64


@dataclass(frozen=True)
class ByteRange:
    """A requested range: ``end`` is inclusive, None when open-ended."""

    start: int
    end: int | None


@dataclass(frozen=True)
class LogSlice:
    """Bytes served and where they sit in the log."""

    data: bytes
    start: int
    total: int

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.start + len(self.data) - 1}/{self.total}"


def parse_range(header: str) -> ByteRange:
    """Parse a ``Range`` header value; raise :class:`BadRequest` naming what is wrong."""
    value = header.strip()
    header = header[:100]  # for messages: never echo a huge header back
    if not value.startswith("bytes="):
        raise BadRequest(f"unsupported Range {header!r}: only 'bytes=START-END' or 'bytes=START-' is supported")
    if "," in value:
        raise BadRequest(f"unsupported Range {header!r}: multiple ranges are not supported")
    if value.startswith("bytes=-"):
        raise BadRequest(f"unsupported Range {header!r}: suffix ranges (bytes=-N) are not supported")
    match = _RANGE.match(value)
    if match is None:
        raise BadRequest(f"malformed Range {header!r}: expected 'bytes=START-END' or 'bytes=START-'")
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) else None
    if end is not None and end < start:
        raise BadRequest(f"malformed Range {header!r}: END ({end}) is before START ({start})")
    return ByteRange(start, end)


def plan(byte_range: ByteRange | None, total: int, cap: int = LOG_CAP) -> tuple[int, int]:
    """The ``[start, stop)`` to read for ``byte_range`` in a log of ``total`` bytes.

    Raises :class:`RangeNotSatisfiable` (with ``Content-Range: bytes */total``) when a range
    starts at or past the end.
    """
    if byte_range is None:
        return 0, min(total, cap)
    if byte_range.start >= total:
        raise RangeNotSatisfiable(
            f"range starts at byte {byte_range.start} but the log has {total} bytes",
            headers={"Content-Range": f"bytes */{total}"},
        )
    if byte_range.end is None:
        return byte_range.start, min(total, byte_range.start + cap)
    return byte_range.start, min(total, byte_range.end + 1, byte_range.start + max(cap, RANGE_CAP))


def read_log(path: str, byte_range: ByteRange | None, cap: int = LOG_CAP) -> LogSlice:
    """Read the planned slice of the log at ``path`` (a missing file is an empty log).

    Blocking: call it in a worker thread.
    """
    try:
        with open(path, "rb") as log:
            total = os.fstat(log.fileno()).st_size
            start, stop = plan(byte_range, total, cap)
            log.seek(start)
            data = log.read(stop - start)
    except FileNotFoundError:
        total = 0
        start, stop = plan(byte_range, total, cap)
        data = b""
    return LogSlice(data=data, start=start, total=total)
