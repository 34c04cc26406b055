"""The launcher's parts and the one direction of the imports between them (docs/architecture.md).

Each folder of ``launcher/`` is one part; a part imports only the parts below it:

    entry (__main__, app) ─▶ api ─▶ frontdoor ─▶ instances ─▶ supervisor ─▶ shared ─▶ forkserver.protocol
    fma ─▶ entry, client          client ─▶ nothing of the server (only ``launcher.__version__``)

``shared`` is the handful of leaf modules every part may use (settings, errors, metrics, logging,
signals, request bodies). Read from the source with ``ast``: nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.launcher_process import REPO

LAUNCHER = REPO / "launcher"
SHARED = {"settings", "errors", "metrics", "logs", "hangup", "shutdown_signals", "request_body", "__init__"}
# What each part may import, besides itself.
ALLOWED: dict[str, set[str]] = {
    "shared": set(),
    "supervisor": {"shared"},
    "instances": {"supervisor", "shared"},
    "frontdoor": {"instances", "shared"},
    "api": {"frontdoor", "instances", "shared"},
    "entry": {"api", "frontdoor", "instances", "supervisor", "shared"},
    "fma": {"entry", "client", "shared"},
    "client": {"version"},
}
# The forkserver's modules the API side may read: the wire protocol and the start-phase markers (no vLLM).
FORKSERVER_ALLOWED = {"forkserver.protocol", "forkserver.phases"}
SIZE_LIMIT = 500  # lines; a longer module says why at its top


def part_of(module: str) -> str:
    """``launcher.instances.manager`` -> ``instances``; top-level modules are ``entry`` or ``shared``."""
    names = module.split(".")
    if len(names) == 1:
        return "shared"  # launcher/__init__.py: the version, nothing else
    if len(names) == 2 and names[1] in SHARED:
        return "shared"
    if len(names) == 2 and (LAUNCHER / names[1] / "__init__.py").exists():
        return names[1]  # the package itself (its __init__)
    if len(names) == 2:
        return "entry"
    return names[1]


def _modules() -> dict[str, Path]:
    found = {}
    for path in LAUNCHER.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]  # a package is imported by its own name: launcher.frontdoor
        found[".".join(parts)] = path
    return found


def _imports(path: Path, module: str) -> set[str]:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from launcher import x`: maybe a module
    return found


def test_each_part_imports_only_the_parts_below_it() -> None:
    modules = _modules()
    wrong = []
    for module, path in sorted(modules.items()):
        part = part_of(module)
        for imported in sorted(_imports(path, module)):
            if imported == "forkserver" and part != "client":
                continue  # `from forkserver import protocol`: the module names are checked one by one
            if imported.split(".")[0] == "forkserver":
                if part == "client" or not any(imported.startswith(ok) for ok in FORKSERVER_ALLOWED):
                    wrong.append(f"{module} imports {imported}")
                continue
            if imported in ("launcher.__version__", "launcher"):
                continue
            if imported not in modules:
                continue  # a name from a module, not a module
            target = part_of(imported)
            if target != part and target not in ALLOWED[part]:
                wrong.append(f"{module} ({part}) imports {imported} ({target})")
    assert not wrong, "imports against the parts' direction:\n" + "\n".join(wrong)


def test_every_folder_is_a_known_part() -> None:
    folders = {path.name for path in LAUNCHER.iterdir() if path.is_dir() and (path / "__init__.py").exists()}
    assert folders == {"api", "instances", "supervisor", "frontdoor", "client", "fma"}


@pytest.mark.parametrize("module", sorted(_modules()))
def test_a_long_module_says_why_at_its_top(module: str) -> None:
    path = _modules()[module]
    text = path.read_text()
    if text.count("\n") <= SIZE_LIMIT:
        return
    docstring = ast.get_docstring(ast.parse(text)) or ""
    top = "\n".join(text.splitlines()[:60])  # or a comment near the top (where the docstring is a --help)
    assert "Why this module is long" in docstring or "# Why this module is long" in top, f"{path.relative_to(REPO)} has {text.count(chr(10))} lines"


def test_the_checker_sees_a_wrong_import(tmp_path: Path) -> None:
    """The direction check is not vacuous: an instances module importing the front door is caught."""
    bad = tmp_path / "manager.py"
    bad.write_text("from launcher.frontdoor.door import FrontDoor\n")
    imported = _imports(bad, "launcher.instances.manager")
    assert "launcher.frontdoor.door" in imported
    assert part_of("launcher.frontdoor.door") not in ALLOWED[part_of("launcher.instances.manager")]


@pytest.mark.parametrize(
    "source",
    [
        "from launcher.frontdoor import FrontDoor\n",  # a name re-exported by the package
        "import launcher.frontdoor\n",
        "from launcher import frontdoor\n",
        "from .. import frontdoor\n",  # relative
        "from launcher.client import LauncherClient\n",  # the client's documented import, in the server
    ],
)
def test_the_checker_sees_a_wrong_import_of_a_package(tmp_path: Path, source: str) -> None:
    modules = _modules()
    bad = tmp_path / "manager.py"
    bad.write_text(source)
    imported = _imports(bad, "launcher.instances.manager")
    checked = [name for name in imported if name in modules]  # what the direction check looks at
    wrong = [name for name in checked if part_of(name) not in ALLOWED["instances"] | {"instances"}]
    assert wrong, f"{source.strip()!r} is not caught: the check sees only {checked}"
