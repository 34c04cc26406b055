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
