"""Start-up clean-up of what a previous launcher left when it was killed (SIGKILL, OOM, power).

Its forkserver and instances died with it (parent-death signals), but nothing was there to
remove their runtime directory and log files. Only what is provably dead is removed: runtime
directories whose API process is gone. (Their shared-memory segments are removed by the next
forkserver, which owns that knowledge.)
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import tempfile

log = logging.getLogger("launcher.instances.sweep")
PID_FILE = "api.pid"
RUNTIME_PREFIX = "vllm-launcher-"


def mark_runtime_dir(runtime_dir: str) -> None:
    """Record that this API process owns ``runtime_dir``."""
    with open(os.path.join(runtime_dir, PID_FILE), "w") as pid_file:
        pid_file.write(str(os.getpid()))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_runtime_dirs(parent: str | None = None) -> list[str]:
    """Runtime directories of launchers (of this user) that are no longer running."""
    stale = []
    for path in glob.glob(os.path.join(parent or tempfile.gettempdir(), RUNTIME_PREFIX + "*")):
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            with open(os.path.join(path, PID_FILE)) as pid_file:
                pid = int(pid_file.read().strip() or "0")
        except (OSError, ValueError):
            continue  # not one of ours, or still being set up
        if pid and not _process_alive(pid):
            stale.append(path)
    return stale


def sweep(log_dir: str) -> None:
    """Remove stale runtime dirs and the old log files of this log dir.

    A dead launcher's shared-memory segments are the forkserver's to remove (forkserver/leftovers.py):
    it removes what the dead forkservers' ledgers list when it starts, and nothing else.
    """
    for path in stale_runtime_dirs():
        log.info("removing the runtime directory of a dead launcher: %s", path)
        shutil.rmtree(path, ignore_errors=True)
    for path in glob.glob(os.path.join(log_dir, "*.log")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
