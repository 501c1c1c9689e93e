"""The report: its picture of the fused cells (on real cells of the bundled example) and its audit cells."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

from server import report


@pytest.fixture(scope="module")
def cells(example_path: Path) -> ad.AnnData:
    """300 log-normalised real cells of the example file."""
    adata = ad.read_h5ad(example_path)
    adata = adata[np.random.default_rng(0).choice(adata.n_obs, 300, replace=False)].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def test_embedding_is_a_tsne_that_keeps_cell_types_together(cells: ad.AnnData) -> None:
    xy, name = report._embedding(cells)
    assert name == "t-SNE" and xy.shape == (300, 2) and np.isfinite(xy).all()
    assert "X_tsne" not in cells.obsm  # the caller's data untouched
    # the five nearest cells in the picture mostly share a cell's type (chance: the largest class's share)
    labels = cells.obs["cell_type"].astype(str).to_numpy()
    d = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    agree = (labels[np.argsort(d, axis=1)[:, :5]] == labels[:, None]).mean()
    chance = max((labels == v).mean() for v in set(labels))
    assert agree > 0.8 and agree > chance + 0.3, (agree, chance)


def test_the_picture_never_imports_umap() -> None:
    """umap-learn compiles pynndescent's numba kernels on its first import in an environment (24 s): the report must
    not import it (checked in a fresh process: other tests may have imported it here)."""
    code = (
        "import sys, anndata as ad, numpy as np; from server.report import _embedding; "
        "x = np.random.default_rng(0).normal(size=(60, 20)).astype(np.float32); "
        "print(_embedding(ad.AnnData(x))[1], 'umap' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["t-SNE", "False"], out.stdout + out.stderr


def test_a_large_set_is_pictured_by_a_seeded_subset(cells: ad.AnnData, monkeypatch: pytest.MonkeyPatch) -> None:
    cells = cells.copy()
    cells.obs["site"] = "a"
    seen: list[Any] = []

    def embed(a: ad.AnnData) -> tuple[np.ndarray, str]:
        seen.append(a.obs_names.tolist())
        return np.zeros((a.n_obs, 2)), "t-SNE"

    monkeypatch.setattr(report, "_embedding", embed)
    monkeypatch.setattr(report, "PLOT_CELLS", 100)
    report._scatter(cells, "cell_type")
    report._scatter(cells, "cell_type")
    assert len(seen[0]) == 100 and len(set(seen[0])) == 100 and seen[0] == seen[1]
    monkeypatch.setattr(report, "PLOT_CELLS", 300)
    report._scatter(cells, "cell_type")
    assert seen[2] == cells.obs_names.tolist()


def test_an_attack_above_its_chance_bound_is_shown_in_bold() -> None:
    audit = {"seed_mia": 0.62, "seed_mia_null95": 0.58, "density_mia": 0.55, "density_mia_null95": 0.6}
    assert report._attack(audit, "seed_mia") == "<b>0.620 (0.580)</b>"
    assert report._attack(audit, "density_mia") == "0.550 (0.600)"
    assert report._attack({"population_mia": 0.5}, "population_mia") == "0.500 (n/a)"  # a run of an older release
