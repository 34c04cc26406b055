"""Phase markers are read back from an instance's log, with or without vLLM's line prefix."""

from __future__ import annotations

from forkserver import phases


def test_markers_are_read_with_and_without_vllms_process_prefix() -> None:
    log = (
        b"launcher: phase options_parsed at 1.5\n"
        b"(APIServer pid=525) launcher: phase engine_ready at 2.25\n"  # vLLM 0.26-0.28 decorate stdout
        b"(APIServer pid=525) launcher: phase engine_ready at 9.0\n"  # only the first counts
        b"said launcher: phase not_a_marker at 3\n"
    )
    assert phases.read(log) == {"options_parsed": 1.5, "engine_ready": 2.25}


def test_the_load_is_its_own_phase_wherever_it_happens() -> None:
    marks = {
        "options_parsed": 10.0,
        "load_wait_start": 10.0,  # waited for the model's zygote to load the weights
        "load_wait_done": 14.0,
        "child_ready": 14.5,
        "load_start": 15.0,  # the weights taken from the zygote inside the engine
        "load_done": 15.25,
        "weights_shared": 15.25,
        "engine_ready": 16.0,
    }
    got = phases.start_phases(marks, received_at=9.5, ready_at=16.5)
    assert got == {
        "parse": 0.5,
        "fork": 0.5,
        "engine_init": 1.25,
        "load": 4.25,
        "compile": 0.0,
        "graphs": 0.0,
        "ready": 0.5,
        "weights_shared": 1.0,
    }
    unshared = {key: value for key, value in marks.items() if not key.startswith(("load_wait", "weights"))}
    got = phases.start_phases(unshared, received_at=9.5, ready_at=16.5)
    assert (got["fork"], got["load"], got["weights_shared"]) == (4.5, 0.25, 0.0)


def test_no_load_markers_no_load_phase() -> None:
    got = phases.start_phases({"child_ready": 1.0, "engine_ready": 2.0}, received_at=0.0, ready_at=3.0)
    assert got is not None and "load" not in got and "weights_shared" not in got
