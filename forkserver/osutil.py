"""Small Linux process helpers (prctl through ctypes, process-group checks)."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies.

    Not inherited across fork, so every process that must die with its parent calls it itself.
    """
    _prctl(PR_SET_PDEATHSIG, int(sig))


def set_child_subreaper() -> None:
    """Make orphaned descendants reparent to this process instead of init."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process took the id: the group is not ours to touch
    return True


def signal_instance(pid: int, sig: int) -> bool:
    """Signal the process group led by ``pid``, or ``pid`` alone if it has no group yet.

    Right after the fork the child has not yet called ``setsid()``: ``killpg`` fails, but the
    signal must not be lost. The forkserver forks with SIGTERM blocked, so it stays pending
    until the child has its default handlers back.
    """
    if signal_group(pid, sig):
        return True
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def group_alive(pgid: int) -> bool:
    """True while any process (zombies included) is left in process group ``pgid``."""
    return signal_group(pgid, 0)


def exit_code_from_status(status: int) -> int:
    """A wait status as an exit code, negative when the process was killed by a signal."""
    return os.waitstatus_to_exitcode(status)


def open_fds() -> list[int]:
    """Every file descriptor open in this process."""
    return sorted(int(name) for name in os.listdir("/proc/self/fd"))


def os_thread_count() -> int:
    """Number of OS threads in this process (Python threads and native pools alike)."""
    return len(os.listdir("/proc/self/task"))


TITLE_PREFIX = "vllm-launcher: "


def set_process_title(title: str, comm: str) -> None:
    """Name this process for ps and top: ``vllm-launcher: <title>`` as its command line, ``comm``
    (the kernel keeps 15 bytes) as its short name.

    Without it, the forkserver, every instance and every EngineCore all read ``python -m
    forkserver --socket ...``. setproctitle finds the command line's memory through ``environ``
    the first time it is used; instances clear their environment (child.py), so the forkserver
    uses it first, before any fork: children (vLLM's ``VLLM::EngineCore`` too) inherit that set-up.
    """
    try:
        import setproctitle
    except ImportError:
        return  # cosmetic: without it, processes keep the command line they started with
    setproctitle.setproctitle(TITLE_PREFIX + title)
    setproctitle.setthreadtitle(comm)  # this (the main) thread's name is the process's comm
