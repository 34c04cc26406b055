"""The event log's window arithmetic and watcher back-pressure, by property."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from launcher.instances.events import EventLog, Gone


@given(window=st.integers(1, 20), published=st.integers(0, 60), since=st.integers(0, 70))
def test_since_returns_exactly_the_missing_events_or_gone(window: int, published: int, since: int) -> None:
    log = EventLog(window=window)
    for number in range(published):
        log.publish("CREATED", {"n": number + 1})
    since = min(since, published)  # the API answers 400 for a future revision before asking
    oldest_kept = max(1, published - window + 1)
    try:
        events = log.since(since)
    except Gone as exc:
        assert since < oldest_kept - 1  # only when something after `since` was dropped
        assert exc.oldest == oldest_kept
        return
    assert [event.revision for event in events] == list(range(since + 1, published + 1))
    assert [event.object["n"] for event in events] == list(range(since + 1, published + 1))


@given(st.integers(0, 30))
def test_revisions_grow_by_one(count: int) -> None:
    log = EventLog(window=5)
    revisions = [log.publish("READY", {}).revision for _ in range(count)]
    assert revisions == list(range(1, count + 1))
    assert log.revision == count


def test_a_slow_watcher_is_dropped_and_the_others_get_everything() -> None:
    async def scenario() -> None:
        log = EventLog(window=100, queue_size=5)
        slow = log.watch()
        fast = log.watch()
        received = []
        for number in range(20):
            log.publish("CREATED", {"n": number})
            while not fast.queue.empty():
                received.append(fast.queue.get_nowait())
        assert [event.object["n"] for event in received] == list(range(20))
        assert slow.dropped and log.watchers == 1
        items = [slow.queue.get_nowait() for _ in range(slow.queue.qsize())]
        assert items[-1] is None  # its stream ends
        assert len(items) <= 5  # never more than its queue: no unbounded memory

    asyncio.run(scenario())


def test_close_ends_every_stream() -> None:
    async def scenario() -> None:
        log = EventLog()
        watchers = [log.watch() for _ in range(3)]
        log.close()
        assert all(watcher.queue.get_nowait() is None for watcher in watchers)
        assert log.watch().queue.get_nowait() is None  # a watch after close ends at once

    asyncio.run(scenario())


def test_bad_sizes() -> None:
    with pytest.raises(ValueError):
        EventLog(window=0)
