"""A model's life in the front door: its phases, and every transition allowed between them.

Standard library only: this is the picture, checked. ``ModelState.move`` is the one place a
model's phase changes; it looks the transition up here, so one the table does not allow is a
bug: it is logged (``ERROR``) in production and raises :class:`IllegalTransition` where
``strict`` is on (the tests turn it on, in-process and in every launcher they start).

::

    stopped ─request─▶ starting ─healthy─▶ ready ─idle, room─▶ sleeping ─request─▶ waking ─awake─▶ ready
      ▲  failed ─request─┘   │                     │                  │                         │
      │    ▲                 │ failed, cancelled   │ idle, room,      │ replaced, stop,          │ no room → sleeping
      │    │                 │ (no instance yet)   │ replaced, stop,  │ delete, room             │ wake failed → stopped
      │    └─────────────────┤                     │ delete           │                          │
      │                      ▼ (with an instance)  ▼                  ▼                          │
      ├──── gone ◀────────── stopping ◀───────────────────────────────┘ (a failed start: → failed)│
      └──── lost (its instance died, or was deleted by someone else): ready, sleeping, waking ─────┘

A seventh word, ``invalid``, is not a phase: it is how a ``stopped`` or ``failed`` model shows
when its profile cannot run (``ModelState.invalid``); a model whose profile turns invalid while its
instance runs keeps serving until that instance is replaced.

Each transition names its effect: what the front door does as the model enters the new phase
(start an instance, put it to sleep, wake it, stop it, serve the waiting requests, release its
room, refuse the waiting requests, adopt an instance).
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass

log = logging.getLogger("launcher.front_door")

# The tests set it (LAUNCHER_TEST_STRICT_LIFECYCLE=1 reaches every launcher they start).
strict = os.environ.get("LAUNCHER_TEST_STRICT_LIFECYCLE") == "1"


class Phase(str, enum.Enum):
    """Where a model is."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"  # the last start failed; the next request tries again
    STOPPING = "stopping"
    SLEEPING = "sleeping"  # idle: sleep — its instance lives, asleep (vLLM's sleep mode)
    WAKING = "waking"  # a request is waking it; others wait for that, as for a start


class Effect(str, enum.Enum):
    """What entering the new phase does."""

    START = "start"  # make room (evicting idle models), create the instance, wait for it to be healthy
    SERVE = "serve"  # the requests waiting for it take their leases
    SLEEP = "sleep"  # POST /sleep to its instance
    WAKE = "wake"  # make room on its GPUs, POST /wake_up
    STOP = "stop"  # delete its instance (waits until no process of it is left)
    RELEASE = "release"  # its room claim and its instance's GPUs and memory are free for others
    REFUSE = "refuse"  # the requests waiting for it get the no-room answer (it stays asleep)
    ADOPT = "adopt"  # an instance a forkserver kept across an API restart is the model's again


@dataclass(frozen=True)
class Transition:
    """An allowed change of phase, what causes it, and its effect."""

    source: Phase
    target: Phase
    causes: frozenset[str]
    effect: Effect


def _t(source: Phase, target: Phase, causes: str, effect: Effect) -> Transition:
    return Transition(source, target, frozenset(causes.split()), effect)


P, E = Phase, Effect
TABLE: tuple[Transition, ...] = (
    _t(P.STOPPED, P.STARTING, "request", E.START),
    _t(P.FAILED, P.STARTING, "request", E.START),
    _t(P.STARTING, P.READY, "healthy", E.SERVE),
    _t(P.STARTING, P.FAILED, "failed cancelled", E.RELEASE),
    _t(P.STARTING, P.STOPPED, "no_room replaced", E.RELEASE),
    _t(P.STARTING, P.STOPPING, "failed cancelled replaced", E.STOP),  # a start given up: its instance goes first
    _t(P.READY, P.SLEEPING, "idle room", E.SLEEP),
    _t(P.READY, P.STOPPING, "idle room replaced stopped deleted evicted", E.STOP),
    _t(P.READY, P.STOPPED, "lost", E.RELEASE),
    _t(P.SLEEPING, P.WAKING, "request", E.WAKE),
    _t(P.SLEEPING, P.STOPPING, "room replaced stopped deleted evicted", E.STOP),
    _t(P.SLEEPING, P.STOPPED, "lost sleep_failed", E.RELEASE),
    _t(P.WAKING, P.READY, "awake", E.SERVE),
    _t(P.WAKING, P.SLEEPING, "no_room", E.REFUSE),
    _t(P.WAKING, P.STOPPED, "lost sleep_failed wake_failed", E.RELEASE),
    _t(P.STOPPING, P.STOPPED, "gone", E.RELEASE),
    _t(P.STOPPING, P.FAILED, "gone", E.RELEASE),  # a failed start's instance is gone
    _t(P.STOPPED, P.READY, "adopted", E.ADOPT),
    _t(P.STOPPED, P.SLEEPING, "adopted", E.ADOPT),
)
TRANSITIONS: dict[tuple[Phase, Phase], Transition] = {(t.source, t.target): t for t in TABLE}


illegal_seen: list[str] = []  # the first illegal transitions this process made (the tests read it)


class IllegalTransition(RuntimeError):
    """A change of phase the table does not allow: a bug in the front door."""


def transition(source: Phase, target: Phase, cause: str, model: str = "?") -> Transition | None:
    """The allowed transition from ``source`` to ``target`` for ``cause``.

    None if the table has none: logged as an error, and :class:`IllegalTransition` when ``strict``.
    """
    found = TRANSITIONS.get((source, target))
    if found is not None and cause in found.causes:
        return found
    message = f"model {model}: illegal transition {source.value} -> {target.value} ({cause})"
    if len(illegal_seen) < 100:
        illegal_seen.append(message)
    if strict:
        raise IllegalTransition(message)
    log.error("%s; please report this bug", message)
    return None
