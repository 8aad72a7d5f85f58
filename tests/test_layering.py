"""The import graph points one way: deploy_app -> bundle, training -> bundle, demo -> both.

Checked on the source (every ``import``/``from`` statement, also inside functions), so a lazy import
cannot hide a dependency that a MAP (which ships ``deploy_app`` and ``bundle`` only) would lack.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

#: package -> the project's top-level packages it must never import.
FORBIDDEN = {
    "deploy_app": {"training", "demo", "bench", "tests"},
    "training": {"deploy_app", "demo", "bench", "tests"},
    "bundle/scripts": {"deploy_app", "training", "demo", "bench", "tests"},
}


def imported_top_levels(path: Path) -> set[tuple[str, int]]:
    """``(top-level module, line)`` of every absolute import in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update((alias.name.split(".")[0], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_against_the_layering(package: str) -> None:
    offending = [
        f"{path.relative_to(REPO_ROOT)}:{line} imports {module}"
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
        for module, line in imported_top_levels(path)
        if module in FORBIDDEN[package]
    ]
    assert not offending, "\n".join(offending)


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from training.splits import x\n    import deploy_app.app\n")
    assert imported_top_levels(module) == {("training", 2), ("deploy_app", 3)}


def touches_sys_path(path: Path) -> bool:
    """Whether the code in ``path`` (docstrings and comments aside) uses ``sys.path``."""
    return any(
        isinstance(node, ast.Attribute)
        and node.attr == "path"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
    )


def test_the_sys_path_checker_ignores_prose(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text('"""Put on ``sys.path`` by the package."""\n')
    assert not touches_sys_path(module)
    module.write_text("import sys\nsys.path.insert(0, 'x')\n")
    assert touches_sys_path(module)


@pytest.mark.parametrize("package", ["deploy_app", "training", "demo"])
def test_the_bundle_code_is_put_on_the_path_by_importing_a_package_only(package: str) -> None:
    """No module reaches for sys.path itself: the package's ``__init__`` does it once."""
    offending = [
        str(path.relative_to(REPO_ROOT))
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
        if path.name != "__init__.py" and touches_sys_path(path)
    ]
    assert not offending
