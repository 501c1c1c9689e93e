"""Bad site files shared by the data-contract tests and the ClientApp tests: small AnnData objects with
planted secrets (cell ids, an expression value) that no error or log text may ever contain, and the one
table of bad inputs (BAD_INPUTS) that both layers refuse."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from shared.data import Expect

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


def no_matrix() -> anndata.AnnData:
    """An AnnData whose X is None."""
    obs = pd.DataFrame({"cell_type": ["a", "a", "b"]}, index=cell_ids(3))
    return anndata.AnnData(obs=obs, var=pd.DataFrame(index=["G1", "G2"]))


def write_site(adata: anndata.AnnData, tmp: Path) -> Path:
    """Write ``adata`` as the site's file ``site.h5ad`` under ``tmp``."""
    path = tmp / "site.h5ad"
    adata.write_h5ad(path)
    return path


def _text_file(tmp: Path) -> Path:
    """A CSV text file renamed to .h5ad."""
    path = tmp / "site.h5ad"
    path.write_text("cell,gene,value\nCELL-SECRET-0001,GENE1,7.123456\n")
    return path


def _plain_hdf5(tmp: Path) -> Path:
    """A valid HDF5 file that is not an AnnData."""
    path = tmp / "site.h5ad"
    with h5py.File(path, "w") as f:
        f["counts"] = with_value(1.0)
    return path


def _directory(tmp: Path) -> Path:
    """A directory named like an .h5ad."""
    (tmp / "site.h5ad").mkdir()
    return tmp / "site.h5ad"


@dataclass(frozen=True)
class BadInput:
    """A bad site input, the text that names its problem and the text that says how to fix it.

    ``build`` makes the input as an AnnData; an input that is bad as a file (nothing to build) has ``bad_file``
    instead, which writes it under a folder and returns its path. ``label_key`` and ``expect`` are what the
    coordinator asks the site for.
    """

    problem: str
    fix: str
    build: Callable[[], anndata.AnnData] | None = None
    bad_file: Callable[[Path], Path] | None = None
    label_key: str = "cell_type"
    expect: Expect = "auto"

    def write(self, tmp: Path) -> Path:
        """The input as the site's file under ``tmp``."""
        if self.build is None:
            assert self.bad_file is not None
            return self.bad_file(tmp)
        return write_site(self.build(), tmp)


LAYER_FIX = "adata.layers['counts']"
BAD_INPUTS: dict[str, BadInput] = {
    # files
    "missing_file": BadInput("no such file", "pass the path", bad_file=lambda tmp: tmp / "nope.h5ad"),
    "directory": BadInput("is a directory", "pass the path", bad_file=_directory),
    "text_file_renamed": BadInput("not an HDF5/h5ad", "adata.write_h5ad", bad_file=_text_file),
    "hdf5_not_anndata": BadInput("not an AnnData", "adata.write_h5ad", bad_file=_plain_hdf5),
    # shape and matrix
    "zero_cells": BadInput("0 cells", "filtering", lambda: site(counts(0, N_GENES))),
    "zero_genes": BadInput("no genes", "write the full", lambda: site(counts(N_CELLS, 0))),
    "x_none": BadInput("adata.X is empty", LAYER_FIX, no_matrix),
    "negative_values": BadInput("negative", LAYER_FIX, lambda: site(with_value(-SECRET_VALUE))),
    "nan": BadInput("1 NaN", "raw counts", lambda: site(with_value(np.nan))),
    "inf": BadInput("1 Inf", "raw counts", lambda: site(with_value(np.inf))),
    "bool_matrix": BadInput("non-numeric dtype bool", "astype", lambda: site(sp.csr_matrix(counts() > 2))),
    "all_zero": BadInput("all zeros", LAYER_FIX, lambda: site(np.zeros((N_CELLS, N_GENES), np.float32))),
    "cpm_like_values": BadInput("un-logged normalised", "sc.pp.log1p", lambda: site(cpm_like())),
    "lognorm_promised_counts": BadInput(
        "holds log-normalised", "provide raw counts", lambda: site(lognorm()), expect="counts"
    ),
    "counts_promised_lognorm": BadInput(
        "holds raw counts", "set expect to 'counts'", lambda: site(with_value(5.0)), expect="lognorm"
    ),
    # genes
    "duplicated_genes": BadInput("2 duplicated gene names", "var_names_make_unique()", duplicated_genes),
    # labels
    "missing_label_column": BadInput("'celltype' not found in obs", "--label-key", site, label_key="celltype"),
    "labels_all_missing": BadInput("all 24 cells are missing", "--label-key", all_missing_labels),
    "continuous_labels": BadInput("looks continuous", "--label-key", continuous_labels),
    "one_cell_per_class": BadInput(
        "too few cells per class", "add labelled cells", lambda: site(labels=[f"type_{i}" for i in range(N_CELLS)])
    ),
}

# The bad inputs' names to parametrise over; writing and reading some of the files warns (duplicated gene names,
# a plain HDF5 file), as expected.
BAD_INPUT_NAMES = [
    pytest.param(
        name,
        marks=(
            pytest.mark.filterwarnings("ignore:Variable names are not unique"),
            pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning"),
        ),
    )
    for name in sorted(BAD_INPUTS)
]


def assert_clear_and_clean(err: Exception, problem: str, fix: str, log_text: str) -> None:
    """One short line naming the problem and the fix; no cell id or planted value in it or in the log text."""
    msg = str(err)
    assert problem.lower() in msg.lower(), msg
    assert fix.lower() in msg.lower(), msg
    assert "\n" not in msg and len(msg) < 400, msg
    for secret in ("CELL-SECRET", *SECRET_TEXTS):
        assert secret not in msg, msg
        assert secret not in log_text, log_text
