"""The report's embedding of the fused cells, on real cells of the bundled example."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc

from server.report import _embedding


def test_embedding_is_a_umap_that_keeps_cell_types_together_and_scanpy_as_it_was(example_path: Path) -> None:
    adata = ad.read_h5ad(example_path)
    adata = adata[np.random.default_rng(0).choice(adata.n_obs, 300, replace=False)].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.settings.verbosity = 2
    xy, name = _embedding(adata)
    assert name == "UMAP" and xy.shape == (300, 2) and np.isfinite(xy).all()
    assert sc.settings.verbosity == 2 and "X_umap" not in adata.obsm  # settings restored, the caller's data untouched
    # the five nearest cells in the picture mostly share a cell's type (chance: the largest class's share)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    d = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    agree = (labels[np.argsort(d, axis=1)[:, :5]] == labels[:, None]).mean()
    chance = max((labels == v).mean() for v in set(labels))
    assert agree > 0.8 and agree > chance + 0.3, (agree, chance)
