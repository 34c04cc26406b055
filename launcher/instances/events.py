"""The launcher's event log: a revision per change, a bounded window, and watchers.

Kubernetes-watch style. Every change to an instance is an event ``{"type", "object"}`` with a
launcher-wide ``revision`` that grows by one per event. The last ``window`` events are kept so
a watcher can resume with ``since=N``; older resumes get :class:`Gone` (HTTP 410).

Watchers get events through a bounded queue. One that falls ``queue_size`` events behind is
dropped (its stream ends; it can resume with ``since``): a slow or vanished watcher never blocks
the launcher or makes it buffer without bound.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

CREATED = "CREATED"
READY = "READY"
STOPPED = "STOPPED"
DELETED = "DELETED"
MODIFIED = "MODIFIED"  # the front door put it to sleep or woke it (``sleeping`` in the state)


class Gone(Exception):
    """The requested revision is older than the kept window."""

    def __init__(self, since: int, oldest: int) -> None:
        super().__init__(
            f"revision {since} is too old: events before revision {oldest} are no longer kept; "
            "watch without 'since' to start from the current state"
        )
        self.oldest = oldest


@dataclass(frozen=True)
class Event:
    """One change: its revision, type and the instance's state after it."""

    revision: int
    type: str
    object: dict[str, Any]
    time: float = field(default_factory=time.time)  # when it happened (a replay shows it, not now)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "object": self.object, "time": self.time}


class Watcher:
    """A bounded queue of events for one watch stream; ``None`` in the queue ends the stream."""

    def __init__(self, queue_size: int) -> None:
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=queue_size)
        self.dropped = False

    def offer(self, event: Event | None) -> bool:
        """Queue ``event``; False (and the watcher marked dropped) if it is too far behind."""
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped = True
            return False
        return True

    def close(self) -> None:
        """End the stream as soon as the watcher has read what it has."""
        if not self.offer(None):
            # Full: make room for the end marker; the watcher was dropped anyway.
            self.queue.get_nowait()
            self.queue.put_nowait(None)


class EventLog:
    """Revisions, the kept window and the live watchers."""

    def __init__(self, *, window: int = 1000, queue_size: int = 1000) -> None:
        if window < 1 or queue_size < 1:
            raise ValueError("window and queue_size must be at least 1")
        self.revision = 0
        self._events: deque[Event] = deque(maxlen=window)
        self._queue_size = queue_size
        self._watchers: set[Watcher] = set()
        self.closed = False

    def next_revision(self) -> int:
        """The revision the next event will carry (states are stamped with it before publishing)."""
        return self.revision + 1

    def publish(self, event_type: str, state: dict[str, Any]) -> Event:
        """Record an event for ``state`` (whose ``revision`` must be :meth:`next_revision`)."""
        self.revision += 1
        event = Event(self.revision, event_type, state)
        self._events.append(event)
        for watcher in list(self._watchers):
            if not watcher.offer(event):
                self._watchers.discard(watcher)
                watcher.close()
        return event

    def since(self, revision: int) -> list[Event]:
        """Kept events after ``revision``; :class:`Gone` if some of them are no longer kept."""
        oldest = self._events[0].revision if self._events else self.revision + 1
        if revision < oldest - 1:
            raise Gone(revision, oldest)
        return [event for event in self._events if event.revision > revision]

    def watch(self) -> Watcher:
        """A new watcher that receives every event published from now on."""
        watcher = Watcher(self._queue_size)
        if self.closed:
            watcher.close()
        else:
            self._watchers.add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        """Forget ``watcher`` (its stream ended)."""
        self._watchers.discard(watcher)

    @property
    def watchers(self) -> int:
        """How many watch streams are open."""
        return len(self._watchers)

    def close(self) -> None:
        """End every watch stream (the launcher is shutting down)."""
        self.closed = True
        for watcher in list(self._watchers):
            watcher.close()
        self._watchers.clear()
