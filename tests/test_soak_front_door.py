"""A short front-door soak with the stand-in: swaps, idle stops, streams, hang-ups, bad requests, kills.

The long one, with the real vLLM, is ``make bench-soak-front-door`` (benchmarks/soak_front_door.py).
"""

from __future__ import annotations

from benchmarks.soak_front_door import run

GOOD = {"200", "hangup", "400", "404"}  # hang-ups are the client's own; 400 and 404 answer the bad requests


def test_a_short_front_door_soak_answers_everything_and_leaves_nothing() -> None:
    result = run("standin", requests=400, kills=2, idle_timeout=0.5)
    assert sum(result["statuses"].values()) + sum(result["statuses_near_kills"].values()) == 400  # none hung
    assert set(result["statuses"]) <= GOOD, result["statuses"]
    # Right after a forkserver kill a request may find its model's instance gone: an OpenAI-shaped 502/503.
    assert set(result["statuses_near_kills"]) <= GOOD | {"502", "503", "stream-error"}, result["statuses_near_kills"]
    assert result["counts"]["starts"] >= 3 and result["counts"]["evictions"] + result["counts"]["idle_stops"] >= 1
    assert result["leftover_processes"] == [] and result["temp_leftovers"] == []
