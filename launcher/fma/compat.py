"""``/app/launcher.py`` of the image: the launcher started the way llm-d FMA starts its own.

FMA's launcher pods run ``python3 launcher.py --mock-gpus --host 0.0.0.0 --port 8001 --log-level
info`` in ``/app``; every one of those flags is also ours. One more thing upstream does: with
``--mock-gpus`` and ``NODE_NAME`` and ``NAMESPACE`` set, it reads this node's mock GPUs from the
``gpu-map`` ConfigMap through the Kubernetes API. Here that ConfigMap is read once at start and
handed to ``--gpu-map`` (a mounted ConfigMap or a file given with ``--gpu-map`` wins); on any
failure the launcher falls back to ``GPU-0`` ... as upstream does.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping

from launcher.__main__ import main as launcher_main

GPU_MAP_CONFIGMAP = "gpu-map"
log = logging.getLogger("launcher.fma.compat")


def _gpu_map_from_api(namespace: str) -> str | None:
    """The ``gpu-map`` ConfigMap's data, saved to a private file; None if it cannot be read."""
    try:
        from launcher.fma.pod_notifier import kubernetes_api

        data = kubernetes_api().read_namespaced_config_map(name=GPU_MAP_CONFIGMAP, namespace=namespace).data
    except Exception as exc:  # noqa: BLE001 - as upstream: fall back to the plain mock GPUs
        log.warning("cannot read ConfigMap %s/%s: %s; mock GPUs are GPU-0...", namespace, GPU_MAP_CONFIGMAP, exc)
        return None
    descriptor, path = tempfile.mkstemp(prefix="gpu-map-", suffix=".json")
    with os.fdopen(descriptor, "w") as saved:
        json.dump(data or {}, saved)
    return path


def main(argv: list[str]) -> int:
    """Run the launcher with upstream's flags; add ``--gpu-map`` from the ConfigMap when upstream would."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    wants_map = "--mock-gpus" in argv and not any(arg.startswith("--gpu-map") for arg in argv)
    namespace = os.environ.get("NAMESPACE", "")
    if wants_map and not os.environ.get("LAUNCHER_GPU_MAP") and os.environ.get("NODE_NAME") and namespace:
        path = _gpu_map_from_api(namespace)
        if path is not None:
            argv = [*argv, "--gpu-map", path]
    argv = [*fma_defaults(argv, os.environ), *argv]
    return launcher_main(argv)


# FMA's launcher: answers as FMA's (docs/fma.md), no instance limit, bodies up to 1 MiB (the
# forkserver's message cap: options and env vars beyond half of it are a 400 naming it). A flag
# or LAUNCHER_* variable given beats these.
FMA_DEFAULTS = {"--fma-compat": None, "--max-instances": "0", "--max-body-bytes": str(1 << 20)}


def fma_defaults(argv: list[str], environ: Mapping[str, str]) -> list[str]:
    """The flags of ``FMA_DEFAULTS`` that neither ``argv`` nor a ``LAUNCHER_*`` variable sets."""
    added: list[str] = []
    for flag, value in FMA_DEFAULTS.items():
        name = flag.removeprefix("--")
        given = any(arg in (flag, f"--no-{name}") or arg.startswith(flag + "=") for arg in argv)
        if given or environ.get("LAUNCHER_" + name.replace("-", "_").upper()):
            continue
        added += [flag] if value is None else [flag, value]
    return added
