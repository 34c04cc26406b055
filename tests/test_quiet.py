"""forkserver/quiet.py: vLLM's Triton notice is a debug record, and the forkserver's exit skips teardown."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from forkserver import quiet
from tests.launcher_process import REPO

SCRIPT = textwrap.dedent(
    """
    import atexit, logging, sys
    from forkserver import quiet

    quiet.demote_triton_notice()
    log = logging.getLogger(quiet.TRITON_LOGGER)
    log.warning(quiet.TRITON_NOTICE + ". Disabling Triton.")  # no handler yet: dropped, not lastResort's
    log.warning("another warning")  # not that notice: shown
    logging.basicConfig(level=logging.DEBUG if sys.argv[1] == "debug" else logging.INFO,
                        format="%(levelname)s %(message)s")
    log.warning(quiet.TRITON_NOTICE + ". Disabling Triton.")
    atexit.register(print, "atexit ran")
    sys.stdout.write("buffered, no newline ")
    quiet.exit_without_teardown(3)
    """
)


def _run(level: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", SCRIPT, level]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


def test_the_triton_notice_shows_only_at_debug_and_other_warnings_still_show() -> None:
    info = _run("info")
    assert info.stderr == "another warning\n"
    debug = _run("debug")
    assert debug.stderr == f"another warning\nDEBUG {quiet.TRITON_NOTICE}. Disabling Triton.\n"


def test_exit_without_teardown_runs_exit_handlers_flushes_and_keeps_the_code() -> None:
    result = _run("info")
    assert result.returncode == 3
    assert result.stdout == "buffered, no newline atexit ran\n"


def test_the_forkserver_still_reports_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "forkserver"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "the following arguments are required: --socket" in result.stderr
