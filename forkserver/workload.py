"""What an instance runs: the interface between the forkserver and the server it forks.

The real workload is vLLM's OpenAI server (:mod:`forkserver.vllm_workload`). A stand-in
(:mod:`forkserver.standin`) implements the same interface for fast lifecycle tests and
benchmarks. ``--workload`` names one as ``module:attribute``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol


class OptionsError(ValueError):
    """The instance's options were rejected; the message is for the user."""


@dataclass(frozen=True)
class ParsedOptions:
    """Options parsed by the workload's own parser, plus what the launcher needs to know."""

    argv: list[str]
    model: str
    port: int
    port_given: bool
    host: str | None = None
    namespace: Any = field(repr=False, default=None)
    parsed_at: float | None = None  # wall clock, set by the forkserver (for the phase markers)
    # Options that cannot start, forked anyway on request (FMA's flow): the child prints this and exits 2.
    error: str | None = None
    # (start, done) wall clock of the weights' load in a zygote that this instance waited for
    waited_for_weights: tuple[float, float] | None = None


@dataclass(frozen=True)
class WorkloadOptions:
    """Switches the launcher passes down (see forkserver/cpu_compat.py and compile_cache_compat.py)."""

    fork_engine: bool = True  # on CPU, fork vLLM's EngineCore instead of spawning it
    in_process_worker: bool = True  # on CPU, run a single-process model inside the EngineCore
    inspect_models_in_fork: bool = True  # vLLM's model inspection in a fork, not a new Python
    compile_cache_fix: bool = True  # let the compiled model load from vLLM's cache (compile_cache_compat.py)
    share_weights: bool = True  # instances of one model fork from a zygote that holds its weights (zygotes.py)


class Workload(Protocol):
    """A server the forkserver can preload and run in forked children."""

    name: str

    def configure(self, options: WorkloadOptions) -> None:
        """Take the launcher's switches (called once, before preload)."""

    def preload(self, modules: list[str] | None) -> None:
        """Import what children will need, once, in the forkserver (None: the workload's default)."""

    def parse(self, argv: list[str]) -> ParsedOptions:
        """Parse instance options with the workload's own parser; raise OptionsError."""

    def run(self, parsed: ParsedOptions) -> int:
        """Serve in the forked child until stopped; return the exit code."""

    def sleep_mode_available(self) -> bool:
        """Whether instances here can sleep (``--enable-sleep-mode``, ``POST /sleep``)."""

    # Optional, for weight sharing (forkserver/zygotes.py): a workload without them never shares.
    #   share_key(parsed, env) -> str | None: instances with equal keys share one zygote
    #   load_shared(parsed, tmpdir) -> None: in the zygote, load what its instances inherit
    #   after_zygote_fork() -> None: in an instance forked from a zygote, before it runs


def load_workload(spec: str) -> Workload:
    """Resolve ``module:attribute`` (or the shorthands ``vllm`` and ``standin``)."""
    shorthands = {"vllm": "forkserver.vllm_workload:WORKLOAD", "standin": "forkserver.standin:WORKLOAD"}
    spec = shorthands.get(spec, spec)
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise ValueError(f"workload {spec!r} is not of the form module:attribute")
    workload: Workload = getattr(importlib.import_module(module_name), attribute)
    return workload


def tokens_name_flag(argv: list[str], flag: str) -> bool:
    """True if ``argv`` sets ``flag`` either as ``--flag value`` or ``--flag=value``."""
    return any(token == flag or token.startswith(flag + "=") for token in argv)


def argparse_error(text: str) -> str:
    """The ``prog: error: ...`` lines of argparse output, without the long usage text."""
    lines = text.strip().splitlines()
    for index, line in enumerate(lines):
        if ": error:" in line:
            return "\n".join(lines[index:]).strip()
    return text.strip() or "invalid options"
