"""The preloading forkserver: imports vLLM once, then forks one child per instance.

Run as ``python -m forkserver --socket PATH``. :mod:`forkserver.protocol` is the only module
the API process imports from here; it pulls in nothing heavy.
"""
