"""The Range parser and planner, by example and by property."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from launcher.api.log_range import LOG_CAP, RANGE_CAP, ByteRange, parse_range, plan, read_log
from launcher.errors import BadRequest, RangeNotSatisfiable


@pytest.mark.parametrize(
    ("header", "expected"),
    [("bytes=0-14", ByteRange(0, 14)), ("bytes=15-", ByteRange(15, None)), (" bytes=7-7 ", ByteRange(7, 7))],
)
def test_parse_valid(header: str, expected: ByteRange) -> None:
    assert parse_range(header) == expected


@pytest.mark.parametrize(
    "header", ["bytes=-5", "bytes=5-2", "bytes=0-1,2-3", "items=0-1", "bytes=", "bytes=a-", "bytes=1-b", "0-1", "bytes=--1"]
)
def test_parse_rejects(header: str) -> None:
    with pytest.raises(BadRequest):
        parse_range(header)


def test_the_documents_30_byte_example() -> None:
    assert plan(None, 30) == (0, 30)
    assert plan(ByteRange(0, 14), 30) == (0, 15)
    assert plan(ByteRange(15, 29), 30) == (15, 30)
    assert plan(ByteRange(15, None), 30) == (15, 30)


def test_an_explicit_range_is_served_whole_up_to_its_bound() -> None:
    assert plan(ByteRange(0, 3 * LOG_CAP - 1), 5 * LOG_CAP) == (0, 3 * LOG_CAP)  # the document's 1 MiB is for START-
    assert plan(ByteRange(0, None), 5 * LOG_CAP) == (0, LOG_CAP)
    assert plan(ByteRange(5, 10 * RANGE_CAP), 20 * RANGE_CAP) == (5, 5 + RANGE_CAP)


def test_unsatisfiable_carries_content_range() -> None:
    with pytest.raises(RangeNotSatisfiable) as caught:
        plan(ByteRange(30, None), 30)
    assert caught.value.headers == {"Content-Range": "bytes */30"}


@given(st.text(max_size=40))
def test_parse_never_crashes(header: str) -> None:
    try:
        result = parse_range(header)
    except BadRequest:
        return
    assert result.start >= 0 and (result.end is None or result.end >= result.start)


@given(
    start=st.integers(0, 5 * LOG_CAP),
    length=st.one_of(st.none(), st.integers(0, 5 * LOG_CAP)),
    total=st.integers(0, 5 * LOG_CAP),
)
def test_plan_properties(start: int, length: int | None, total: int) -> None:
    end = None if length is None else start + length
    try:
        first, stop = plan(ByteRange(start, end), total)
    except RangeNotSatisfiable:
        assert start >= total
        return
    assert first == start < total
    assert first < stop <= total  # never empty, never past the end
    if end is None:
        assert stop - first <= LOG_CAP  # the 1 MiB cap of an open-ended range
    else:
        # What was asked for, as the document has it (no 1 MiB cap), up to the 64 MiB bound.
        assert stop == min(total, end + 1, start + RANGE_CAP)


@given(total=st.integers(0, 3 * LOG_CAP))
def test_no_range_is_capped(total: int) -> None:
    assert plan(None, total) == (0, min(total, LOG_CAP))


def test_read_log_slices_and_missing_file(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_bytes(bytes(range(256)) * 10)
    piece = read_log(str(log), ByteRange(10, 19))
    assert piece.data == (bytes(range(256)) * 10)[10:20]
    assert piece.content_range == "bytes 10-19/2560"
    assert read_log(str(tmp_path / "missing.log"), None).data == b""
    with pytest.raises(RangeNotSatisfiable):
        read_log(str(tmp_path / "missing.log"), ByteRange(0, None))
