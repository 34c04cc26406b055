"""Framing of forkserver messages and instance-id validation, by property."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkserver import protocol

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
messages = st.dictionaries(st.text(max_size=10), json_values, max_size=6)


@given(st.lists(messages, max_size=5), st.integers(1, 64))
def test_frames_round_trip_whatever_the_chunking(batch: list[dict], chunk: int) -> None:
    stream = b"".join(protocol.encode(message) for message in batch)
    buffer = protocol.FrameBuffer()
    received = []
    for offset in range(0, len(stream), chunk):
        received += buffer.feed(stream[offset : offset + chunk])
    assert received == batch


def test_oversized_frames_are_refused_both_ways() -> None:
    with pytest.raises(protocol.FrameError):
        protocol.encode({"x": "y" * protocol.MAX_FRAME})
    with pytest.raises(protocol.FrameError):
        protocol.FrameBuffer().feed(protocol.HEADER.pack(protocol.MAX_FRAME + 1))


@pytest.mark.parametrize("body", [b"not json", b"[1]", b'"s"', b"\xff\xfe"])
def test_garbage_frames_are_refused(body: bytes) -> None:
    with pytest.raises(protocol.FrameError):
        protocol.FrameBuffer().feed(protocol.HEADER.pack(len(body)) + body)


@given(st.text(max_size=140))
def test_instance_id_rule(candidate: str) -> None:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    expected = (
        1 <= len(candidate) <= 128
        and set(candidate) <= allowed
        and candidate[0] not in "._-"
    )
    assert protocol.valid_instance_id(candidate) is expected
    if expected:
        assert "/" not in candidate and candidate not in (".", "..")


def test_encode_is_json() -> None:
    frame = protocol.encode({"op": "hello", "id": 1})
    assert json.loads(frame[protocol.HEADER.size :]) == {"op": "hello", "id": 1}
