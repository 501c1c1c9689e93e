"""Shared fixtures: real example data, the team datasets folder (optional), quiet Flower."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
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


# ----------------------------------------------------------------------------- federation fixtures
@pytest.fixture(autouse=True)
def flower_task_identity() -> Iterator[None]:
    """Let tests build Flower Messages outside a Flower runtime (flwr 1.42 internal API); seed global RNGs."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    random.seed(0)
    np.random.seed(0)
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


SITES = ("site_a", "site_b", "site_c")


@pytest.fixture(scope="session")
def three_site_h5ad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic raw-count file with 3 sites in obs['site'] (3 classes, 60 genes, 270 cells)."""
    from fake_sites import make_site_adata

    adata = make_site_adata(n_cells=270, n_genes=60, n_labels=3, seed=3)
    adata.obs["site"] = pd.Categorical([SITES[i % 3] for i in range(adata.n_obs)])
    path = tmp_path_factory.mktemp("fed") / "three_sites.h5ad"
    adata.write_h5ad(path)
    return path


def _tiny_run_config(data: Path, out: Path, **extra: object) -> dict[str, object]:
    """Run config of a seconds-long federation on `three_site_h5ad` (plumbing, not quality)."""
    return {
        "sim-data-path": str(data),
        "sim-site-key": "site",
        "out-dir": str(out),
        "run-id": "tiny",
        "n-genes": 40,
        "latent-dim": 8,
        "num-pretrain-rounds": 1,
        "vae-local-steps": 5,
        "scdg-local-steps": 5,
        "vae-batch-size": 64,
        "scdg-batch-size": 64,
        "cells-per-class": 2,
        "distill-iterations": 2,
        "num-distill-rounds": 2,
        "finetune-steps": 2,
        "mlp-min-steps": 5,
        "mlp-max-steps": 5,
        "report": False,
        "min-sites": 2,
        **extra,
    }


@pytest.fixture
def tiny_config(three_site_h5ad: Path, tmp_path: Path) -> dict[str, object]:
    """A seconds-long federation's run config on `three_site_h5ad`, with a per-test output folder."""
    return _tiny_run_config(three_site_h5ad, tmp_path / "out")


@pytest.fixture
def site_cache(tmp_path: Path) -> dict[str, str]:
    """node_config entry pointing the site cache at a per-test folder."""
    return {"cache-dir": str(tmp_path / "site-cache")}


@pytest.fixture
def interrupt_at_round(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], Callable[[], None]]:
    """``interrupt_at_round(r)`` makes the next federation stop (KeyboardInterrupt) when it reaches distillation round
    r, as a coordinator killed there would; it returns the function that lets later runs go through."""
    from server import orchestration

    real = orchestration.run_round

    def install(rnd: int) -> Callable[[], None]:
        def stop(run: orchestration.Run, r: int) -> None:
            if r == rnd:
                raise KeyboardInterrupt
            real(run, r)

        monkeypatch.setattr(orchestration, "run_round", stop)
        return lambda: monkeypatch.setattr(orchestration, "run_round", real)

    return install


# ----------------------------------------------------------------------------- test order (make test runs 2 workers)
# `make test` runs pytest-xdist with --dist loadfile --no-loadscope-reorder: a file's tests run in one worker, files are
# handed out in collection order. The longest files go first (longest processing time first), so that no worker is
# left alone with a several-minute file at the end while the other idles; the rest keep pytest's order.
LONGEST_FIRST = (  # measured: pytest --durations (the deployment test alone takes about 7 minutes)
    "tests/integration/test_deployment.py",
    "tests/integration/test_flower_simulation.py",
    # the first four files go two to a worker before any is done: these two keep the pairs even
    "tests/integration/test_federation.py",
    "tests/server/test_cli.py",
    "tests/test_benchmark_tools.py",
    "tests/integration/test_reference.py",
    "tests/integration/test_test_cells_isolation.py",
    "tests/shared/test_distill.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item: pytest.Item) -> int:
        return rank.get("tests/" + item.nodeid.split("::")[0].removeprefix("tests/"), len(LONGEST_FIRST))

    items.sort(key=key)  # stable: the order within a file and among the other files is pytest's
