"""Synthetic site data for fast plumbing tests (not for quality claims: use real data for those)."""

from __future__ import annotations

import logging

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from shared.data import InputKind, normalize

logger = logging.getLogger(__name__)

_BLOCK_ROWS = 4096  # cells generated per block, so large sites never exist as one dense matrix
_NB_SHAPE = 2.0  # gamma shape of the gamma-Poisson (negative binomial) noise


def _class_programs(rng: np.random.Generator, n_labels: int, n_genes: int) -> np.ndarray:
    """Return an (n_labels, n_genes) matrix of fold changes: each class up-regulates its own gene set."""
    programs = np.ones((n_labels, n_genes))
    n_marked = max(1, n_genes // (2 * n_labels))
    for c in range(n_labels):
        marked = rng.choice(n_genes, size=n_marked, replace=False)
        programs[c, marked] *= rng.uniform(4.0, 10.0, size=n_marked)
    return programs


def make_site_adata(
    n_cells: int = 200,
    n_genes: int = 100,
    n_labels: int = 3,
    *,
    seed: int = 0,
    kind: InputKind = "counts",
    label_key: str = "cell_type",
) -> anndata.AnnData:
    """Return a synthetic site: negative-binomial-like counts with class-specific gene programs."""
    if n_cells < 1 or n_genes < 1 or n_labels < 1:
        msg = f"n_cells, n_genes and n_labels must be >= 1, got {n_cells}, {n_genes}, {n_labels}"
        raise ValueError(msg)
    if kind not in ("counts", "lognorm"):
        msg = f"kind must be 'counts' or 'lognorm', got {kind!r}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    base = rng.lognormal(mean=0.0, sigma=1.0, size=n_genes)
    programs = _class_programs(rng, n_labels, n_genes)
    labels = rng.permutation(np.arange(n_cells) % n_labels)
    library = rng.lognormal(mean=0.0, sigma=0.3, size=n_cells)
    blocks = []
    for start in range(0, n_cells, _BLOCK_ROWS):
        rows = slice(start, min(start + _BLOCK_ROWS, n_cells))
        mu = library[rows, None] * base[None, :] * programs[labels[rows]]
        lam = rng.gamma(shape=_NB_SHAPE, scale=mu / _NB_SHAPE)
        blocks.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
    X = sp.vstack(blocks, format="csr").astype(np.float32)
    if kind == "lognorm":
        X = normalize(X, "counts")
    obs = pd.DataFrame(
        {
            label_key: pd.Categorical([f"type_{c}" for c in labels]),
            "batch": pd.Categorical([f"batch_{i % 2}" for i in range(n_cells)]),
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    logger.debug("synthetic site: %d cells x %d genes, %d classes, %s", n_cells, n_genes, n_labels, kind)
    return anndata.AnnData(X=X, obs=obs, var=var)
