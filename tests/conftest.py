"""Shared fixtures: real example data, the team datasets folder (optional), quiet Flower."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "shared" / "example_data" / "kang_pbmc_muscat.h5ad"
TEAM_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def example_path() -> Path:
    """The bundled real example file (Kang et al. PBMC subset, raw counts, 4 samples)."""
    return EXAMPLE


@pytest.fixture(scope="session")
def team_data() -> Path:
    """The team's dataset folder beside the checkout; skips where it is absent (users' clones)."""
    if not TEAM_DATA.is_dir():
        pytest.skip("../shared/data not present (team datasets are not part of a user clone)")
    return TEAM_DATA
