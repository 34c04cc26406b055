"""The launcher's REST API: a lean Starlette app that drives the forkserver.

Never imports torch or vllm: those live in the forkserver process only.
"""

__version__ = "2.0"
