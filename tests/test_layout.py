"""Package layout rules: our top-level packages resolve to this checkout, shared/ models import without
Flower, and client/ and server/ never import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_packages_resolve_inside_the_repository() -> None:
    import client
    import server
    import shared

    for pkg in (shared, server, client):
        assert Path(pkg.__file__).resolve().is_relative_to(REPO), pkg.__file__


def test_core_modules_import_without_flower() -> None:
    code = (
        "import importlib, sys\n"
        "for m in ('shared.data', 'shared.distill', 'shared.models'):\n"
        "    importlib.import_module(m)\n"
        "    bad = sorted(n for n in sys.modules if n == 'flwr' or n.startswith('flwr.'))\n"
        "    if bad:\n"
        "        sys.exit(f'{m} imported {bad[:3]}')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr[-500:]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(("package", "forbidden"), [("client", "server"), ("server", "client")])
def test_client_and_server_never_import_each_other(package: str, forbidden: str) -> None:
    offenders = [p.name for p in (REPO / package).rglob("*.py") if forbidden in _imports(p)]
    assert not offenders, f"{package}/ imports {forbidden}: {offenders}"


def test_only_the_protocol_package_imports_flower_inside_shared() -> None:
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "shared").rglob("*.py")
        if "flwr" in _imports(p) and "protocol" not in p.relative_to(REPO / "shared").parts
    ]
    assert not offenders, offenders
