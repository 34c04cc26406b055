"""Compatibility steps for vLLM's compile cache on CPU: the compiled model loads, and loads fast.

vLLM's default mode compiles the model with torch.compile and saves the result as an AOT
artifact (``$VLLM_CACHE_ROOT/torch_compile_cache/torch_aot_compile/<hash>/rank_0_0/model``,
the C++ kernels beside it in ``inductor_cache/``). The next start is meant to load it instead of
compiling again. On CPU, with vLLM 0.32 and torch 2.13, three things stand in the way; each
step below is gated on the behaviour it works around, not on a version number, and all three
are switched off together with ``--no-compile-cache-fix`` (``LAUNCHER_COMPILE_CACHE_FIX=0``).

1. **The load always fails** (:func:`let_compiled_model_load`). Every start compiles again
   (about 5 s for the tiny model here), in a cold ``vllm serve`` too::

       Compiling model again due to a load failure from ..., reason: 'function' object has no
       attribute 'finalize_loading'

   ``vllm/compilation/decorators.py`` (``_try_load_aot_compiled_fn``) calls
   ``loaded_fn._artifacts.compiled_fn.finalize_loading(vllm_config)`` on every artifact. Only
   vLLM's own backend (``VllmSerializableFunction``, mode ``VLLM_COMPILE``, the GPU default) has
   that method. On CPU vLLM sets mode ``DYNAMO_TRACE_ONCE`` with torch's plain ``inductor``
   backend (``vllm/platforms/cpu.py``), whose artifact torch wraps in a plain function that is
   ready to call once unpickled. The step gives such a function a no-op ``finalize_loading``;
   artifacts that have one (vLLM's backend, so every GPU) are untouched.

2. **Loading a kernel first precompiles a C++ header** (same function). torch's
   ``CppPythonBindingsCodeCache.load_async`` builds the precompiled ``cpp_prefix.h`` (preprocess,
   hash, compile: 0.5 s with the ``.gch`` on disk, 3.7 s without) before it looks for the
   kernel's ``.so``, which is already in the cache. While an artifact loads, the step hands
   torch a plain header that includes the real one instead: no compile when the ``.so`` exists,
   and the same kernel (the header's text instead of its precompiled form) when one is missing.
   Compiles after the load are untouched.

3. **Every process probes the CPU's vector ISA again** (:func:`probe_vector_isa_once`):
   ``torch._inductor.cpu_vec_isa.valid_vec_isa_list`` compiles and loads a test program per ISA
   (1.1 s here) and caches the answer in the process only. The forkserver asks once at preload,
   so every instance inherits the answer.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator
from typing import Any

_LOADER_MODULE = "vllm.compilation.decorators"
_LOADER_FUNCTION = "_try_load_aot_compiled_fn"
_MARK = "_launcher_compile_cache_fix"
_PLAIN_HEADER_DIR = "launcher_plain_headers"


def needed() -> bool:
    """True if the installed vLLM's AOT loader calls ``finalize_loading`` on what it loads."""
    try:
        module = importlib.import_module(_LOADER_MODULE)
    except ImportError:
        return False
    loader = getattr(module, _LOADER_FUNCTION, None)
    code = getattr(loader, "__code__", None)
    return code is not None and "finalize_loading" in code.co_names


def _finalize_nothing(_vllm_config: Any) -> None:
    """torch's own compiled function is ready once unpickled: nothing to finalise."""


def _give_finalize_loading(loaded: Any) -> Any:
    compiled = getattr(getattr(loaded, "_artifacts", None), "compiled_fn", None)
    if compiled is not None and not hasattr(compiled, "finalize_loading"):
        try:
            compiled.finalize_loading = _finalize_nothing
        except (AttributeError, TypeError):
            pass  # an object that takes no attributes: vLLM then compiles again, as without us
    return loaded


def _plain_header(header: str, hashable_cmd_line: str, **_compile_command: Any) -> str:
    """A header that includes ``header``: what ``-include`` needs, without precompiling it."""
    from torch._inductor import codecache

    # Relative: under the inductor cache vLLM chose for this artifact (never a .gch beside it).
    return codecache.write(f"#include <{header}>\n", "h", extra=hashable_cmd_line, specified_dir=_PLAIN_HEADER_DIR)[1]


@contextlib.contextmanager
def _no_header_precompile() -> Iterator[None]:
    try:
        from torch._inductor import codecache
    except ImportError:
        yield
        return
    original = getattr(codecache, "_precompile_header", None)
    if original is None:  # a torch without precompiled headers: nothing to skip
        yield
        return
    codecache._precompile_header = _plain_header  # type: ignore[assignment]
    try:
        yield
    finally:
        codecache._precompile_header = original


def let_compiled_model_load() -> bool:
    """Install steps 1 and 2 in this process if vLLM needs them; True if installed (or already)."""
    if not needed():
        return False
    import torch.compiler

    original = torch.compiler.load_compiled_function
    if getattr(original, _MARK, False):
        return True

    @functools.wraps(original)
    def load_compiled_function(*args: Any, **kwargs: Any) -> Any:
        with _no_header_precompile():
            return _give_finalize_loading(original(*args, **kwargs))

    setattr(load_compiled_function, _MARK, True)
    torch.compiler.load_compiled_function = load_compiled_function
    return True


def probe_vector_isa_once() -> int:
    """Step 3, in the forkserver: ask torch for the CPU's vector ISAs; how many it found (-1: none asked)."""
    try:
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list
    except ImportError:
        return -1
    return len(valid_vec_isa_list())
