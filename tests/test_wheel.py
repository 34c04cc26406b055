"""What users install starts: the project built as a wheel and installed into a scratch environment.

The test environment is an editable install of the checkout, which hides a package the wheel
leaves out (``launcher.frontdoor`` once was: every image built from the Dockerfile failed at
start). So a wheel is built from a copy of the sources, installed (no vLLM) into a fresh venv, and
run from a folder outside the checkout: ``python -m launcher --help``, ``launcherctl --help``,
FMA's ``/app/launcher.py --help``, an import of every module, and every file of the dashboard.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("launcher", "forkserver")

IMPORT_ALL = """
import importlib, json, pkgutil, sys
names = []
for top in ("launcher", "forkserver"):
    package = importlib.import_module(top)
    names.append(top)
    names += [info.name for info in pkgutil.walk_packages(package.__path__, top + ".")]
for name in names:
    module = importlib.import_module(name)
    assert sys.prefix in (getattr(module, "__file__", None) or next(iter(module.__path__))), (name, module)
import importlib.resources as resources
ui = sorted(entry.name for entry in resources.files("launcher.api.ui").iterdir() if entry.is_file())
print(json.dumps({"modules": names, "ui": ui, "vllm": "vllm" in sys.modules, "torch": "torch" in sys.modules}))
"""


def _source_files(suffix: str | None = None) -> set[str]:
    """The checkout's files of both packages, relative to the checkout (no caches)."""
    found = set()
    for top in PACKAGES:
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and (suffix is None or path.suffix == suffix):
                found.add(path.relative_to(ROOT).as_posix())
    return found


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], Path]:
    """A venv holding the built wheel and its dependencies: (its python, an environment, a folder outside)."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"  # a copy: building in the checkout would leave build/ and *.egg-info there
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for top in PACKAGES:
        shutil.copytree(ROOT / top, source / top, ignore=shutil.ignore_patterns("__pycache__"))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    wheels = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels),
          str(source)], base, env)  # fmt: skip
    (wheel,) = wheels.glob("vllm_launcher-*.whl")
    scratch = base / "venv"
    venv.create(scratch, with_pip=True)
    python = scratch / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--quiet", f"{wheel}[fma]"], base, env)
    outside = base / "elsewhere"  # not the checkout: nothing can be imported from the sources
    outside.mkdir()
    return python, env, outside


def test_the_wheel_holds_every_module_and_dashboard_file(installed: tuple[Path, dict[str, str], Path]) -> None:
    import json

    python, env, outside = installed
    report = json.loads(_run([str(python), "-c", IMPORT_ALL], outside, env).stdout)
    modules = {name.replace(".", "/") for name in report["modules"]}
    expected = {path.removesuffix(".py").removesuffix("/__init__") for path in _source_files(".py")}
    assert expected <= modules | {path.rsplit("/", 1)[0] for path in modules}, sorted(expected - modules)
    assert set(report["ui"]) == {Path(path).name for path in _source_files() if path.startswith("launcher/api/ui/")}
    assert not report["vllm"] and not report["torch"], "importing the launcher's modules must not import vLLM"


def test_the_installed_commands_start(installed: tuple[Path, dict[str, str], Path]) -> None:
    python, env, outside = installed
    assert "--models-file" in _run([str(python), "-m", "launcher", "--help"], outside, env).stdout
    assert "usage" in _run([str(python.parent / "launcherctl"), "--help"], outside, env).stdout.lower()
    # FMA's pod runs `python3 launcher.py` in /app, with PYTHONPATH=/app.
    app = outside / "app"
    shutil.copytree(ROOT / "deploy" / "fma" / "app", app)
    fma_env = {**env, "PYTHONPATH": str(app)}
    assert "--mock-gpus" in _run([str(python), "launcher.py", "--help"], app, fma_env).stdout
    assert "usage" in _run([str(python), "-m", "forkserver", "--help"], outside, env).stdout.lower()
