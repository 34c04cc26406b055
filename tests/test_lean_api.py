"""The API process must never import torch or vllm."""

from __future__ import annotations

import subprocess
import sys

from tests.launcher_process import REPO


def test_importing_the_app_and_client_pulls_in_no_torch_or_vllm() -> None:
    code = (
        "import sys, launcher.app, launcher.__main__, launcher.instances.manager, forkserver.protocol; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm', 'transformers', 'numpy')); "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_running_launcher_has_no_torch_or_vllm_mapped(standin) -> None:  # type: ignore[no-untyped-def]
    with open(f"/proc/{standin.process.pid}/maps") as mapping:
        maps = mapping.read()
    assert "torch" not in maps and "/vllm/" not in maps
