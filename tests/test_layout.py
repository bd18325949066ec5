"""The house rules a refactor could silently break: every package is installed, and no library file reaches
into another file's private names. (Layers and cycles are `lint-imports`' job: `make lint`.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _installed_name(package_dir: Path) -> str:
    relative = package_dir.relative_to(ROOT)
    if relative.parts[0] == "cli":
        return ".".join(("posthoc", *relative.parts))
    return ".".join(relative.parts)


def test_every_package_is_in_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {_installed_name(init.parent) for init in (ROOT / "posthoc").rglob("__init__.py")}
    found |= {_installed_name(init.parent) for init in (ROOT / "cli").rglob("__init__.py")}
    assert found - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("posthoc")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name} from {node.module}")
    return found


def test_no_library_file_imports_another_files_private_names():
    files = [*(ROOT / "posthoc").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]
    offenders = [line for path in files for line in _private_imports(path)]
    assert offenders == [], "make these public where they belong, or pass what is needed:\n" + "\n".join(offenders)
