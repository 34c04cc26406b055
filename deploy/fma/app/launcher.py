#!/usr/bin/env python3
"""``python3 launcher.py`` in ``/app``, as llm-d FMA's launcher pods run it: this launcher instead.

Takes upstream's flags (``--mock-gpus``, ``--mock-gpu-count``, ``--host``, ``--port``,
``--log-level``; every other ``python -m launcher`` flag too). Like upstream, with
``--mock-gpus`` and ``NODE_NAME`` and ``NAMESPACE`` set, the node's mock GPUs come from the
``gpu-map`` ConfigMap (read once through the Kubernetes API, unless ``--gpu-map`` names a file).
"""

import os
import sys

# This file is named like the launcher package: take /app (and the cwd) off the path first.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != HERE]
sys.modules.pop("launcher", None)

from launcher.fma.compat import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
