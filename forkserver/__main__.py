"""``python -m forkserver --socket PATH``: preload the workload, then serve forks on PATH."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import tempfile
import time

# Before anything imports numpy: one OpenBLAS thread, so the server stays single-threaded at
# fork. Children get the environment as it was when we started.
_ORIGINAL_ENV = dict(os.environ)
os.environ["OPENBLAS_NUM_THREADS"] = "1"

from forkserver import fork_safety, leftovers, osutil, quiet
from forkserver.server import ForkServer, bind_listener, make_private_dir
from forkserver.workload import WorkloadOptions, load_workload


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m forkserver", description=__doc__)
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--workload", default="vllm", help="vllm, standin, or module:attribute")
    parser.add_argument(
        "--preload",
        default=None,
        help="comma-separated modules to import before accepting (default: vLLM's serve path)",
    )
    parser.add_argument(
        "--die-with-parent",
        type=int,
        default=None,
        metavar="PID",
        help="exit (with every instance) when process PID, our parent, dies",
    )
    parser.add_argument("--tmp-root", default=None, help="parent of the per-instance TMPDIRs")
    parser.add_argument("--verbose", action="store_true", help="say what was preloaded, and where it listens")
    parser.add_argument(
        "--shm-ledger",
        default=None,
        metavar="DIR",
        help="where each instance's /dev/shm segments are noted for a later forkserver to remove "
        "(default: <tmp>/vllm-launcher-<uid>/shm-ledger; see forkserver/leftovers.py)",
    )
    parser.add_argument(
        "--fork-engine",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CPU, fork vLLM's EngineCore instead of spawning it (see forkserver/cpu_compat.py)",
    )
    parser.add_argument(
        "--in-process-worker",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CPU, run a single-process model inside the EngineCore (no Worker process)",
    )
    parser.add_argument(
        "--inspect-models-in-fork",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="inspect a new model architecture in a fork of the instance (see forkserver/model_inspection.py)",
    )
    parser.add_argument(
        "--compile-cache-fix",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let vLLM load its compiled model from the cache on CPU (see forkserver/compile_cache_compat.py)",
    )
    parser.add_argument(
        "--share-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="instances of one model fork from a zygote that loaded its weights once: one copy in memory, "
        "starts that do not read them (see forkserver/zygotes.py)",
    )
    parser.add_argument(
        "--zygote-linger",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="how long a model's zygote (and its copy of the weights) stays after its last instance is gone",
    )
    return parser.parse_args(argv)


def _preload_list(value: str | None) -> list[str] | None:
    """The modules named by ``--preload``; None (the workload's default) when it is not given."""
    if value is None:
        return None
    return [module.strip() for module in value.split(",") if module.strip()]


def _prepare_for_fork() -> None:
    """Release what children cannot inherit (see fork_safety.py) and say what is left."""
    shutdowns = fork_safety.release_nvml()
    if shutdowns:
        print(
            f"forkserver: released NVML (left initialised by preload; {shutdowns} shutdown(s))",
            file=sys.stderr,
            flush=True,
        )
    leftover = fork_safety.device_fds()
    if leftover:
        print(f"forkserver: warning: GPU device fds still open at fork time: {leftover}", file=sys.stderr, flush=True)
    if fork_safety.cuda_initialized():
        raise SystemExit("forkserver: CUDA is initialised in the forkserver; forked instances could not use the GPU")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parse_args(argv)
    if args.die_with_parent is not None:
        osutil.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != args.die_with_parent:
            return 1  # the parent is already gone
    osutil.set_child_subreaper()
    osutil.set_process_title(f"forkserver {args.socket}", comm="vllm-forkserver")  # before any fork
    ledger = leftovers.Ledger(args.shm_ledger or leftovers.default_ledger_dir())
    swept = ledger.sweep_dead()  # what the instances of a killed launcher's forkserver left
    if swept:
        print(f"forkserver: removed {len(swept)} shared-memory segment(s) of a dead forkserver's instances",
              file=sys.stderr, flush=True)  # fmt: skip
    # Until the loop installs its handlers, SIGTERM simply ends us (nothing forked yet).
    make_private_dir(os.path.dirname(os.path.abspath(args.socket)))
    tmp_root = args.tmp_root or tempfile.mkdtemp(prefix="fs-", dir=os.path.dirname(args.socket))
    os.makedirs(tmp_root, mode=0o700, exist_ok=True)

    quiet.demote_triton_notice()  # before the workload imports vLLM
    workload = load_workload(args.workload)
    workload.configure(
        WorkloadOptions(
            fork_engine=args.fork_engine,
            in_process_worker=args.in_process_worker,
            inspect_models_in_fork=args.inspect_models_in_fork,
            compile_cache_fix=args.compile_cache_fix,
            share_weights=args.share_weights,
        )
    )
    started = time.monotonic()
    try:
        workload.preload(_preload_list(args.preload))
    except Exception as exc:  # noqa: BLE001 - a start-up error, said in one line the launcher shows
        print(f"forkserver: cannot preload {workload.name}: {exc}", file=sys.stderr, flush=True)
        return 2
    preload_seconds = time.monotonic() - started
    _prepare_for_fork()
    extra = fork_safety.extra_threads()
    if args.verbose:  # the launcher says it in one line (forkserver_process.py); the details at debug level
        print(
            f"forkserver: pid {os.getpid()} preloaded {workload.name} in {preload_seconds:.2f}s, "
            f"{1 + len(extra)} OS thread(s), listening on {args.socket}",
            file=sys.stderr,
            flush=True,
        )
    if extra:
        print(
            f"forkserver: warning: {len(extra)} extra OS thread(s) at fork time ({', '.join(extra)}); "
            "children inherit only the main one",
            file=sys.stderr,
            flush=True,
        )
    # Objects that exist now are shared with every child; frozen, the collector never touches
    # (and so never copies) their pages.
    gc.freeze()
    listener = bind_listener(args.socket)
    server = ForkServer(
        listener=listener,
        workload=workload,
        base_env=_ORIGINAL_ENV,
        tmp_root=tmp_root,
        preload_seconds=preload_seconds,
        ledger=ledger,
        zygote_linger=max(0.0, args.zygote_linger),
    )
    try:
        server.serve_forever()
    finally:
        listener.close()
        ledger.close()
        try:
            os.unlink(args.socket)
        except OSError:
            pass
        if args.tmp_root is None:
            import shutil

            shutil.rmtree(tmp_root, ignore_errors=True)
    return 0


def _exit_code(exc: SystemExit) -> int:
    """The status Python gives ``SystemExit(exc.code)``; a message is printed, as Python does."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    try:
        exit_code = main()
    except SystemExit as exc:
        exit_code = _exit_code(exc)
    # Not sys.exit: the interpreter's teardown prints Triton's nanobind leak report (see quiet.py).
    quiet.exit_without_teardown(exit_code)
