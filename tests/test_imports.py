"""Import hygiene: every module imports on its own, and the CLI (`d2nwg.commands`) is a leaf nothing in the library imports."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "d2nwg"
MODULES = sorted(
    "d2nwg." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
    if p.name != "__main__.py"
)


def imported_modules(source: str, package: str = "d2nwg") -> set[str]:
    """Absolute names that ``source`` imports (``from . import x`` resolved against ``package``)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


# Each module is imported first, into a clean slate of d2nwg modules: an import cycle only shows when one of
# its modules is imported first. One interpreter for all keeps torch & co. loaded once (seconds, not minutes).
FRESH_IMPORTS = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "d2nwg" or m.startswith("d2nwg.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as err:
        failed.append(f"{name}: {type(err).__name__}: {err}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_each_module_imports_first():
    done = subprocess.run([sys.executable, "-c", FRESH_IMPORTS, *MODULES], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_the_fresh_import_check_catches_a_cycle(tmp_path):
    # Guards the check itself: a cycle that only breaks when ``d2nwg.cycle_b`` is imported first.
    (tmp_path / "d2nwg").mkdir()
    (tmp_path / "d2nwg" / "__init__.py").write_text("")
    (tmp_path / "d2nwg" / "cycle_a.py").write_text("from d2nwg.cycle_b import B\nA = 1\n")
    (tmp_path / "d2nwg" / "cycle_b.py").write_text("import d2nwg.cycle_a\nB = 1\n")
    done = subprocess.run(
        [sys.executable, "-c", FRESH_IMPORTS, "d2nwg.cycle_a", "d2nwg.cycle_b"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert done.returncode == 1 and "d2nwg.cycle_b: ImportError" in done.stdout
    assert "d2nwg.cycle_a:" not in done.stdout


def test_nothing_in_the_library_imports_the_cli():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        package = ".".join(("d2nwg", *path.relative_to(PACKAGE).parent.parts))
        names = imported_modules(path.read_text(), package)
        if path.parent.name != "commands" and any(n == "d2nwg.commands" or n.startswith("d2nwg.commands.") for n in names):
            offenders.append(str(path.relative_to(PACKAGE)))
    assert offenders == []


@pytest.mark.parametrize(
    "source, package",
    [
        ("from d2nwg.commands import main", "d2nwg"),
        ("from d2nwg import commands", "d2nwg"),
        ("import d2nwg.commands as c", "d2nwg"),
        ("from . import commands", "d2nwg"),
        ("from .. import commands", "d2nwg.models"),
        ("from ..commands import main", "d2nwg.models"),
    ],
)
def test_import_scan_sees_every_spelling_of_a_cli_import(source, package):
    assert "d2nwg.commands" in imported_modules(source, package)
