"""The forked child: turn a copy of the forkserver into one isolated instance, then serve.

:func:`become_instance` never returns: whatever happens, it ends in ``os._exit``.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Mapping

from forkserver import osutil
from forkserver.workload import ParsedOptions, Workload

# Exit codes that are a contract between the child and the forkserver (and so the API).
EXIT_SETUP_FAILED = 70  # the child could not prepare itself before the server ran (EX_SOFTWARE)
EXIT_SERVER_CRASHED = 1  # the server raised
EXIT_BAD_OPTIONS = 2  # the options cannot start (argparse's code, as `vllm serve` exits with them)


def _die_with_parent() -> None:
    # Set again in every process an instance forks: the flag is not inherited across fork.
    osutil.set_parent_death_signal(signal.SIGKILL)


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    # As in any Python program (`vllm serve` included): a write to a closed pipe is an EPIPE error
    # the server handles, not a signal that kills the instance.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _redirect_stdio(log_fd: int) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    for fd in osutil.open_fds():
        if fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass  # the fd that listed /proc/self/fd is already gone
    # Line buffering: each line reaches the O_APPEND file in one write, so stdout and stderr
    # (and helper processes) interleave only at line boundaries.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)


def _apply_environment(env: Mapping[str, str], tmpdir: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.environ["TMPDIR"] = tmpdir  # vLLM's ZMQ sockets and dist files go here; removed on reap
    os.environ["PYTHONUNBUFFERED"] = "1"
    tempfile.tempdir = None  # cached at import time in the forkserver


def become_instance(
    *,
    instance_id: str,
    workload: Workload,
    parsed: ParsedOptions,
    log_fd: int,
    env: Mapping[str, str],
    tmpdir: str,
    forkserver_pid: int,
    nice: int = 0,
) -> None:
    """Set up the child (session, log, env, temp dir, death signal), run the workload; always ``os._exit``.

    ``nice`` lowers the instance's CPU priority (and its helpers', which inherit it): the
    front door's compile-ahead runs at 19, so that it never competes with serving.
    """
    code = EXIT_SETUP_FAILED
    try:
        os.setsid()
        _die_with_parent()
        if os.getppid() != forkserver_pid:  # the forkserver died before the flag was set
            os._exit(code)
        os.register_at_fork(after_in_child=_die_with_parent)
        osutil.set_process_title(f"instance {instance_id}", comm="vllm-instance")  # a forked EngineCore renames itself
        if nice:
            os.nice(nice)
        _reset_signals()
        atexit._clear()  # the forkserver's handlers are not ours to run
        _redirect_stdio(log_fd)
        _apply_environment(env, tmpdir)
        code = EXIT_SERVER_CRASHED
        if parsed.error is not None:
            print(parsed.error, file=sys.stderr)  # what `vllm serve` would say before exiting
            code = EXIT_BAD_OPTIONS
        else:
            code = workload.run(parsed)
    except KeyboardInterrupt:
        code = 0  # vLLM turns a SIGTERM during start-up into KeyboardInterrupt: a requested stop
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child must never return into the server loop
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        try:
            atexit._run_exitfuncs()  # what the server registered (multiprocessing clean-up, ...)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
