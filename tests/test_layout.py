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


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter at the repository root; its stdout (it must exit 0)."""
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert res.returncode == 0, res.stderr[-800:]
    return res.stdout


def test_core_modules_import_without_flower() -> None:
    _python(
        "import importlib, sys\n"
        "for m in ('shared.data', 'shared.distill', 'shared.models'):\n"
        "    importlib.import_module(m)\n"
        "    bad = sorted(n for n in sys.modules if n == 'flwr' or n.startswith('flwr.'))\n"
        "    if bad:\n"
        "        sys.exit(f'{m} imported {bad[:3]}')\n"
    )


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


# The rooms that are not part of the Flower app bundle (pyproject [tool.flwr.app] fab-exclude).
TOOLING = ("server/cli", "server/bench", "server/pki")


def _bundle_names() -> set[str]:
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    return set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO))).namelist())


@pytest.mark.slow  # over 5 s: outside the fast tier
def test_the_app_bundle_carries_the_run_time_packages_and_nothing_else() -> None:
    names = _bundle_names()
    code = {
        str(p.relative_to(REPO))
        for pkg in ("shared", "server", "client")
        for p in (REPO / pkg).rglob("*.py")
        if not str(p.relative_to(REPO)).startswith(TOOLING) and "__pycache__" not in p.parts
    }
    assert names == code | {"pyproject.toml", "README.md", ".info/CONTENT"}, sorted(names ^ code)


@pytest.mark.slow  # over 5 s: outside the fast tier
def test_what_the_apps_import_is_in_the_bundle_and_never_tooling() -> None:
    loaded = set(
        _python(
            "import importlib, sys\n"
            "importlib.import_module('server.app'); importlib.import_module('client.app')\n"
            "print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in ('shared', 'server', 'client'))))\n"
        ).split()
    )
    names = _bundle_names()

    def in_bundle(module: str) -> bool:
        path = module.replace(".", "/")
        return not path.startswith(TOOLING) and bool({f"{path}.py", f"{path}/__init__.py"} & names)

    assert [m for m in sorted(loaded) if not in_bundle(m)] == []
    # and no bundled module imports a tooling room anywhere (lazily inside a function included)
    offenders = [
        name
        for name in names
        if name.endswith(".py") and any(m.replace(".", "/").startswith(TOOLING) for m in _modules(REPO / name))
    ]
    assert not offenders, offenders


def _modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_the_files_make_test_starts_first_exist() -> None:
    """A renamed long test file would silently lose its place at the front of the 2-worker run (tests/conftest.py)."""
    from conftest import LONGEST_FIRST, REPO

    assert [name for name in LONGEST_FIRST if not (REPO / name).is_file()] == []
