"""Bad site files shared by the data-contract tests and the ClientApp tests: small AnnData objects with
planted secrets (cell ids, an expression value) that no error or log text may ever contain."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

SECRET_VALUE = 7.123456  # planted in matrices; its text must never appear in a message
SECRET_TEXTS = ("7.12", "7123")
N_CELLS = 24
N_GENES = 12


def cell_ids(n: int) -> list[str]:
    """Distinctive obs_names that must never appear in error text."""
    return [f"CELL-SECRET-{i:04d}" for i in range(1, n + 1)]


def counts(n_cells: int = N_CELLS, n_genes: int = N_GENES) -> np.ndarray:
    """Small integer count matrix with no all-zero row."""
    rng = np.random.default_rng(0)
    x = rng.poisson(3.0, size=(n_cells, n_genes)).astype(np.float32)
    if n_genes:
        x[:, 0] += 1
    return x


def lognorm() -> np.ndarray:
    """Log-normalised version of _counts with the secret value planted."""
    x = counts()
    x = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)
    x[0, 1] = SECRET_VALUE
    return x


def site(
    x: np.ndarray | sp.spmatrix | None = None, labels: object = None, genes: list[str] | None = None
) -> anndata.AnnData:
    """AnnData with secret cell ids, 3 balanced classes (unless labels given) and CSR X."""
    x = counts() if x is None else x
    n_cells, n_genes = x.shape
    if labels is None:
        labels = pd.Categorical([f"type_{i % 3}" for i in range(n_cells)])
    obs = pd.DataFrame({"cell_type": labels, "donor": "d1"}, index=cell_ids(n_cells))
    var = pd.DataFrame(index=genes if genes is not None else [f"GENE{j}" for j in range(n_genes)])
    X = sp.csr_matrix(x) if isinstance(x, np.ndarray) and x.dtype.kind in "iuf" else x
    return anndata.AnnData(X=X, obs=obs, var=var)


def with_value(value: float) -> np.ndarray:
    """Counts with the secret value and one planted bad value."""
    x = counts()
    x[1, 2] = SECRET_VALUE
    x[2, 3] = value
    return x


def cpm_like() -> np.ndarray:
    """Library-size-normalised values without log (CPM)."""
    x = counts() + 0.0
    x = x / x.sum(axis=1, keepdims=True) * 1e6
    x[0, 1] = 7123.456
    return x.astype(np.float32)


def all_missing_labels() -> anndata.AnnData:
    """Every label is NaN."""
    return site(labels=pd.Categorical([np.nan] * N_CELLS, categories=["type_0"]))


def continuous_labels() -> anndata.AnnData:
    """A label column of hundreds of distinct floats."""
    values = np.random.default_rng(1).random(N_CELLS * 20) * 100
    values[0] = SECRET_VALUE
    return site(counts(N_CELLS * 20), labels=values)


def duplicated_genes() -> anndata.AnnData:
    """Three columns share one gene name (two duplicates)."""
    return site(genes=["GENE1"] * 3 + [f"G{j}" for j in range(N_GENES - 3)])
