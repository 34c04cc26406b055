"""The real workload: vLLM's OpenAI-compatible server, run in-process in the forked child."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import sys
import time
from typing import Any

from forkserver import (
    compile_cache_compat,
    cpu_compat,
    fork_safety,
    model_path,
    phases,
    vllm_entrypoints,
    weight_sharing,
)
from forkserver.workload import OptionsError, ParsedOptions, WorkloadOptions, argparse_error, tokens_name_flag


class VllmWorkload:
    """Preloads vLLM, parses options with vLLM's own parser, runs its server."""

    name = "vllm"

    def __init__(self) -> None:
        self._parser: Any = None
        self._options = WorkloadOptions()

    def configure(self, options: WorkloadOptions) -> None:
        """Remember the CPU compatibility switches for the children."""
        self._options = options

    def preload(self, modules: list[str] | None) -> None:
        """Import ``modules`` (None: the default for this vLLM and platform) and build the parser.

        A module that fails to import is reported, not fatal. Fatal, with a message naming the
        cause: a vLLM layout the launcher does not know, or a module that initialises CUDA
        (forked instances could not use the GPU after that).
        """
        found = vllm_entrypoints.check_layout()
        print(
            f"forkserver: vLLM {vllm_entrypoints.installed_version()}: "
            + ", ".join(f"{name} from {module}" for name, module in found.items()),
            file=sys.stderr,
            flush=True,
        )
        if modules is None:
            modules = vllm_entrypoints.default_preload(_device_type())
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception as exc:  # noqa: BLE001 - a bad preload entry must not stop the server
                print(f"forkserver: could not preload {module}: {exc}", file=sys.stderr, flush=True)
            if fork_safety.cuda_initialized():
                raise RuntimeError(
                    f"importing {module} initialised CUDA in the forkserver: forked instances could not use "
                    "the GPU; leave it out of --preload"
                )
        self._parser = vllm_entrypoints.make_parser()
        if self._options.compile_cache_fix and _device_type() == "cpu":
            try:
                compile_cache_compat.probe_vector_isa_once()  # inherited by every instance
            except Exception as exc:  # noqa: BLE001 - torch compiles a test program: no C++ compiler here
                # Eager instances need no compiler: say it once, and leave the compile cache to vLLM.
                why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                print(
                    f"forkserver: warning: torch cannot probe the CPU's vector instructions ({why}); the "
                    "compile-cache fix is off. vLLM's default mode compiles the model with a C++ compiler: "
                    "install one (g++), or start instances with --enforce-eager",
                    file=sys.stderr,
                    flush=True,
                )
                self._options = dataclasses.replace(self._options, compile_cache_fix=False)

    def parse(self, argv: list[str]) -> ParsedOptions:
        """Parse ``argv`` as ``vllm serve`` would; the error message is vLLM's own."""
        if self._parser is None:
            self._parser = vllm_entrypoints.make_parser()
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
                args = self._parser.parse_args(argv)
        except SystemExit:
            raise OptionsError(argparse_error(captured.getvalue())) from None
        if args.model_tag:
            args.model = args.model_tag  # as `vllm serve MODEL` does
        model_given = bool(args.model_tag) or tokens_name_flag(argv, "--model")
        if not model_given:
            raise OptionsError("options must name a model: add --model MODEL (a local path or model id)")
        problem = model_path.local_model_problem(str(args.model))
        if problem is not None:
            raise OptionsError(problem)
        args.model = model_path.expand(str(args.model))
        try:
            vllm_entrypoints.validate_args()(args)
        except (ValueError, TypeError) as exc:
            raise OptionsError(f"vllm serve: error: {exc}") from None
        return ParsedOptions(
            argv=list(argv),
            model=str(args.model),
            port=int(args.port),
            port_given=tokens_name_flag(argv, "--port"),
            host=getattr(args, "host", None),
            namespace=args,
        )

    def sleep_mode_available(self) -> bool:
        """vLLM's sleep mode exists on CUDA, ROCm and XPU, not on CPU (``Platform.is_sleep_mode_available``)."""
        return _sleep_mode_available()

    def share_key(self, parsed: ParsedOptions, env: dict[str, str]) -> str | None:
        """Instances with the same key share one zygote (forkserver/weight_sharing.py); None: no sharing."""
        if not self._options.share_weights or parsed.namespace is None:
            return None
        if env.get("LAUNCHER_SHARE_WEIGHTS", "1").lower() in ("0", "false", "no", "off"):
            return None  # this instance opted out (env_vars): it loads its own copy
        return weight_sharing.share_key(
            parsed.namespace,
            env,
            fork_engine=self._options.fork_engine,
            in_process_worker=self._options.in_process_worker,
        )

    def load_shared(self, parsed: ParsedOptions, tmpdir: str) -> None:
        """In a zygote: load the model's weights once, for every instance forked from here."""
        import torch

        vllm_entrypoints.reconfigure_logging_from_env()
        if self._options.inspect_models_in_fork:
            vllm_entrypoints.inspect_models_in_fork()
        threads = torch.get_num_threads()
        if not weight_sharing.openmp_releasable():
            torch.set_num_threads(1)  # a pool that cannot be freed must never exist before the forks
        weight_sharing.quiet_progress_bars()  # no tqdm monitor thread in a process that forks
        shared = weight_sharing.load_for_sharing(parsed.namespace, tmpdir)
        weight_sharing.forget_progress_bar_lock()  # each fork makes its own, none shares this one's
        shared.torch_threads = threads
        if os.environ.get("LAUNCHER_ZYGOTE_HUGE_PAGES") == "1":  # a trade-off, off by default (weight_sharing.py)
            began = time.perf_counter()
            collapsed = weight_sharing.collapse_into_huge_pages()
            seconds = time.perf_counter() - began
            shared.details["huge_pages"] = {"bytes": collapsed, "seconds": seconds}
            print(f"launcher: zygote: {collapsed / 2**20:.0f} MiB in huge pages ({seconds:.2f}s)", file=sys.stderr, flush=True)
        if not weight_sharing.release_openmp():
            raise RuntimeError("could not free OpenMP's threads: instances forked from here would hang")
        extra = fork_safety.extra_threads()
        if extra:
            print(f"launcher: zygote: {len(extra)} extra thread(s) after the load: {', '.join(extra)}", file=sys.stderr, flush=True)
        weight_sharing.INHERITED = shared

    def after_zygote_fork(self) -> None:
        """In an instance forked from a zygote: torch's thread count as the forkserver had it."""
        import torch

        shared = weight_sharing.INHERITED
        if shared is not None and torch.get_num_threads() != shared.torch_threads:
            torch.set_num_threads(shared.torch_threads)

    def run(self, parsed: ParsedOptions) -> int:
        """Serve until stopped (SIGTERM ends uvicorn, then vLLM shuts its engine down)."""
        import uvloop

        if parsed.parsed_at is not None:
            phases.mark("options_parsed", at=parsed.parsed_at)
        if parsed.waited_for_weights is not None:  # forked from a zygote that loaded them meanwhile
            phases.mark("load_wait_start", at=parsed.waited_for_weights[0])
            phases.mark("load_wait_done", at=parsed.waited_for_weights[1])
        phases.mark("child_ready")
        vllm_entrypoints.reconfigure_logging_from_env()
        if self._options.fork_engine and os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") != "spawn":
            cpu_compat.keep_helpers_forked(in_process_worker=self._options.in_process_worker)
        vllm_entrypoints.mark_engine_ready(lambda: phases.mark("engine_ready"))
        vllm_entrypoints.mark_compile_and_graphs(phases.mark)
        weight_sharing.install_load_hook(phases.mark)  # times every load; takes a zygote's weights
        if self._options.inspect_models_in_fork:
            vllm_entrypoints.inspect_models_in_fork()
        if self._options.compile_cache_fix:
            compile_cache_compat.let_compiled_model_load()
        args = parsed.namespace
        vllm_entrypoints.configure_logging_from_args(args)
        uvloop.run(vllm_entrypoints.run_server()(args))
        return 0


def _sleep_mode_available() -> bool:
    from vllm.platforms import current_platform

    check = getattr(current_platform, "is_sleep_mode_available", None)
    return bool(check()) if check is not None else False


def _device_type() -> str:
    """vLLM's platform here (``cpu``, ``cuda``, ...). Detecting it uses NVML, never CUDA."""
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


WORKLOAD = VllmWorkload()
