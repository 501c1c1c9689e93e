"""Every bad input is refused with a SiteDataError that names the problem, says how to fix it
and leaks neither cell ids nor expression values (error text may travel to the coordinator)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from bad_sites import (
    N_CELLS,
    N_GENES,
    SECRET_TEXTS,
    SECRET_VALUE,
    all_missing_labels,
    cell_ids,
    continuous_labels,
    counts,
    cpm_like,
    duplicated_genes,
    lognorm,
    site,
    with_value,
)

from shared.data import check_file, detect_kind, prepare_site, read_h5ad
from shared.errors import SiteDataError

logger = logging.getLogger(__name__)


def _prepare(build: Callable[[], anndata.AnnData], **kwargs: object) -> Callable[[Path], object]:
    """Return a case runner that builds an AnnData and prepares it in memory."""
    return lambda _tmp: prepare_site(build(), label_key="cell_type", **kwargs)


def _via_file(build: Callable[[], anndata.AnnData], **kwargs: object) -> Callable[[Path], object]:
    """Return a case runner that builds an AnnData, writes it to disk and checks the file."""

    def run(tmp: Path) -> object:
        """Write the AnnData and check the file."""
        path = tmp / "site.h5ad"
        build().write_h5ad(path)
        return check_file(path, label_key="cell_type", **kwargs)

    return run


def _text_file(tmp: Path) -> object:
    """A CSV text file renamed to .h5ad."""
    path = tmp / "notes.h5ad"
    path.write_text("cell,gene,value\nCELL-SECRET-0001,GENE1,7.123456\n")
    return read_h5ad(path)


def _plain_hdf5(tmp: Path) -> object:
    """A valid HDF5 file that is not an AnnData."""
    path = tmp / "matrix.h5ad"
    with h5py.File(path, "w") as f:
        f["counts"] = with_value(1.0)
    return read_h5ad(path)


def _directory(tmp: Path) -> object:
    """A directory named like an .h5ad."""
    (tmp / "site_dir.h5ad").mkdir()
    return check_file(tmp / "site_dir.h5ad", label_key="cell_type")


def _object_matrix(_tmp: Path) -> object:
    """An object-dtype matrix (anndata can hold one; it cannot be written)."""
    x = np.array([["1", "CELL-SECRET-0001"], ["7.123456", "2"]], dtype=object)
    return detect_kind(x)


@dataclass(frozen=True)
class Case:
    """A bad input, the word that names its problem and the text that says how to fix it."""

    run: Callable[[Path], object]
    problem: str
    fix: str


def _no_x() -> anndata.AnnData:
    """An AnnData whose X is None."""
    obs = pd.DataFrame({"cell_type": ["a", "a", "b"]}, index=cell_ids(3))
    return anndata.AnnData(obs=obs, var=pd.DataFrame(index=["G1", "G2"]))


LAYER_FIX = "adata.layers['counts']"
CASES: dict[str, Case] = {
    # files
    "missing_file": Case(lambda tmp: read_h5ad(tmp / "nope.h5ad"), "no such file", "pass the path"),
    "directory": Case(_directory, "is a directory", "pass the path"),
    "text_file_renamed": Case(_text_file, "not an HDF5/h5ad", "adata.write_h5ad"),
    "hdf5_not_anndata": Case(_plain_hdf5, "not an AnnData", "adata.write_h5ad"),
    # shape and matrix
    "zero_cells": Case(_prepare(lambda: site(counts(0, N_GENES))), "0 cells", "filtering"),
    "zero_genes": Case(_prepare(lambda: site(counts(N_CELLS, 0))), "no genes", "write the full"),
    "x_none": Case(_prepare(_no_x), "adata.X is empty", LAYER_FIX),
    "negative_values": Case(_prepare(lambda: site(with_value(-SECRET_VALUE))), "negative", LAYER_FIX),
    "nan": Case(_via_file(lambda: site(with_value(np.nan))), "1 NaN", "raw counts"),
    "inf": Case(_prepare(lambda: site(with_value(np.inf))), "1 Inf", "raw counts"),
    "object_matrix": Case(_object_matrix, "non-numeric dtype object", "astype('float32')"),
    "string_matrix": Case(lambda _t: detect_kind(np.array([["7.123456", "1"]])), "non-numeric dtype", "astype"),
    "bool_matrix": Case(_prepare(lambda: site(sp.csr_matrix(counts() > 2))), "non-numeric dtype bool", "astype"),
    "all_zero": Case(_prepare(lambda: site(np.zeros((N_CELLS, N_GENES), np.float32))), "all zeros", LAYER_FIX),
    "cpm_like_values": Case(_prepare(lambda: site(cpm_like())), "un-logged normalised", "sc.pp.log1p"),
    "lognorm_promised_counts": Case(
        _prepare(lambda: site(lognorm()), expect="counts"), "holds log-normalised", "provide raw counts"
    ),
    "counts_promised_lognorm": Case(
        _via_file(lambda: site(with_value(5.0)), expect="lognorm"), "holds raw counts", "set expect to 'counts'"
    ),
    # genes
    "duplicated_genes": Case(_prepare(duplicated_genes), "2 duplicated gene names", "var_names_make_unique()"),
    "no_vocabulary_overlap": Case(
        _prepare(site, vocabulary=["ENSG0001", "ENSG0002"]), "no overlap", "symbols vs Ensembl"
    ),
    "low_vocabulary_coverage": Case(
        _prepare(site, vocabulary=["GENE0", *[f"X{j}" for j in range(9)]], min_coverage=0.5),
        "coverage too low",
        "check gene identifiers",
    ),
    # labels
    "missing_label_column": Case(
        lambda _t: prepare_site(site(), label_key="celltype"), "'celltype' not found in obs", "--label-key"
    ),
    "labels_all_missing": Case(_via_file(all_missing_labels), "all 24 cells are missing", "--label-key"),
    "continuous_labels": Case(_prepare(continuous_labels), "looks continuous", "--label-key"),
    "one_cell_per_class": Case(
        _prepare(lambda: site(labels=[f"type_{i}" for i in range(N_CELLS)])),
        "too few cells per class",
        "add labelled cells",
    ),
}


def test_at_least_sixteen_distinct_cases() -> None:
    """The suite covers at least 16 distinct bad inputs."""
    assert len(CASES) >= 16


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning")
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_clearly_and_without_leaks(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SiteDataError naming the problem and the fix; no cell id or value in error or log text."""
    case = CASES[name]
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SiteDataError) as info:
        case.run(tmp_path)
    msg = str(info.value)
    assert case.problem.lower() in msg.lower(), msg
    assert case.fix.lower() in msg.lower(), msg
    assert "\n" not in msg and len(msg) < 400, msg
    for leaked in ("CELL-SECRET", *SECRET_TEXTS):
        assert leaked not in msg, msg
        assert leaked not in caplog.text, caplog.text
