#!/usr/bin/env python3
"""``python3 /app/launcher_pod_notifier.py``, the sidecar FMA's controller adds: ours instead.

Same environment and annotation contract as upstream's; follows the launcher's watch stream
instead of polling (see launcher/fma/pod_notifier.py).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != HERE]
sys.modules.pop("launcher", None)

from launcher.fma.pod_notifier import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
