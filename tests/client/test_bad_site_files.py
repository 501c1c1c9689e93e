"""Bad site files reach the ClientApp the way they would in a hospital: named by the SuperNode's
node config. Each is refused with one line naming the problem and the fix, and nothing planted in
the file (cell ids, an expression value) reaches the error text, which Flower forwards to the coordinator."""

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
    SECRET_TEXTS,
    SECRET_VALUE,
    all_missing_labels,
    continuous_labels,
    counts,
    cpm_like,
    duplicated_genes,
    lognorm,
    site,
    with_value,
)
from flwr.app import Context, Message, RecordDict

from client.app import app
from server.synthesis import fresh_models, model_json, state_of
from shared.errors import FedscddError, SiteDataError
from shared.protocol import Plan, PretrainRequest, ProfileRequest, SiteSpec


@dataclass(frozen=True)
class BadFile:
    """How to write the bad file, the spec the coordinator sends, what the message names and how it says to fix it."""

    write: Callable[[Path], Path]
    problem: str
    fix: str
    spec: SiteSpec = SiteSpec()


def _h5ad(build: Callable[[], anndata.AnnData]) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        path = tmp / "site.h5ad"
        build().write_h5ad(path)
        return path

    return write


def _text(tmp: Path) -> Path:
    path = tmp / "site.h5ad"
    path.write_text("cell,gene,value\nCELL-SECRET-0001,GENE1,7.123456\n")
    return path


def _plain_hdf5(tmp: Path) -> Path:
    path = tmp / "site.h5ad"
    with h5py.File(path, "w") as f:
        f["counts"] = with_value(1.0)
    return path


def _directory(tmp: Path) -> Path:
    (tmp / "site.h5ad").mkdir()
    return tmp / "site.h5ad"


FIX_LAYER = "adata.layers['counts']"
CASES: dict[str, BadFile] = {
    "missing_file": BadFile(lambda tmp: tmp / "nope.h5ad", "no such file", "pass the path"),
    "directory": BadFile(_directory, "is a directory", "pass the path"),
    "not_hdf5": BadFile(_text, "not an HDF5/h5ad", "adata.write_h5ad"),
    "hdf5_not_anndata": BadFile(_plain_hdf5, "not an AnnData", "adata.write_h5ad"),
    "zero_cells": BadFile(_h5ad(lambda: site(counts(0))), "0 cells", "filtering"),
    "negative_values": BadFile(_h5ad(lambda: site(with_value(-SECRET_VALUE))), "negative", FIX_LAYER),
    "nan": BadFile(_h5ad(lambda: site(with_value(np.nan))), "1 NaN", "raw counts"),
    "inf": BadFile(_h5ad(lambda: site(with_value(np.inf))), "1 Inf", "raw counts"),
    "bool_matrix": BadFile(_h5ad(lambda: site(sp.csr_matrix(counts() > 2))), "non-numeric dtype bool", "astype"),
    "all_zero": BadFile(_h5ad(lambda: site(np.zeros_like(counts()))), "all zeros", FIX_LAYER),
    "scaled_cpm": BadFile(_h5ad(lambda: site(cpm_like())), "un-logged normalised", "sc.pp.log1p"),
    "lognorm_promised_counts": BadFile(
        _h5ad(lambda: site(lognorm())), "holds log-normalised", "provide raw counts", SiteSpec(expect="counts")
    ),
    "counts_promised_lognorm": BadFile(
        _h5ad(lambda: site(with_value(5.0))), "holds raw counts", "set expect to 'counts'", SiteSpec(expect="lognorm")
    ),
    "duplicated_genes": BadFile(_h5ad(duplicated_genes), "2 duplicated gene names", "var_names_make_unique()"),
    "missing_label_column": BadFile(
        _h5ad(site), "'celltype' not found in obs", "--label-key", SiteSpec(label_key="celltype")
    ),
    "labels_all_missing": BadFile(_h5ad(all_missing_labels), "all 24 cells are missing", "--label-key"),
    "continuous_labels": BadFile(_h5ad(continuous_labels), "looks continuous", "--label-key"),
    "one_cell_per_class": BadFile(
        _h5ad(lambda: site(labels=pd.Categorical([f"type_{i}" for i in range(N_CELLS)]))),
        "too few cells per class",
        "add labelled cells",
    ),
}


def _ctx(path: Path, tmp: Path) -> Context:
    node = {"data-path": str(path), "site-name": "hospital-a", "cache-dir": str(tmp / "cache")}
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={"torch-threads": 1})


def _assert_clear_and_clean(err: FedscddError, problem: str, fix: str, log_text: str) -> None:
    msg = str(err)
    assert problem.lower() in msg.lower() and fix.lower() in msg.lower(), msg
    assert "\n" not in msg and len(msg) < 400, msg
    for secret in ("CELL-SECRET", *SECRET_TEXTS):
        assert secret not in msg, msg
        assert secret not in log_text, log_text


def test_at_least_fifteen_kinds_of_bad_site_file() -> None:
    assert len(CASES) >= 15


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning")
@pytest.mark.parametrize("name", sorted(CASES))
def test_clientapp_refuses_a_bad_site_file_in_one_clean_line(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    case = CASES[name]
    caplog.set_level(logging.DEBUG)
    msg = Message(ProfileRequest(case.spec).to_record(), dst_node_id=7, message_type="query.profile")
    with pytest.raises(SiteDataError) as info:
        app(msg, _ctx(case.write(tmp_path), tmp_path))
    _assert_clear_and_clean(info.value, case.problem, case.fix, caplog.text)


def test_clientapp_refuses_a_plan_whose_genes_the_site_does_not_have(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = _h5ad(site)(tmp_path)
    plan = Plan(tuple(f"ENSG{j:05d}" for j in range(20)), ("type_0", "type_1", "type_2"), SiteSpec())
    vae, _ = fresh_models(plan, latent_dim=4, seed=0)
    req = PretrainRequest("vae", 1, state_of(vae), model_json(vae), plan, 2, 1e-3, 8, (1.0, 1.0), 0)
    with pytest.raises(SiteDataError) as info:
        app(Message(req.to_record(), dst_node_id=7, message_type="train.pretrain"), _ctx(path, tmp_path))
    _assert_clear_and_clean(info.value, "no overlap", "symbols vs Ensembl", caplog.text)


@pytest.mark.filterwarnings("ignore:only one class")
def test_a_single_class_site_is_valid_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    path = _h5ad(lambda: site(labels=pd.Categorical(["sorted_B"] * N_CELLS)))(tmp_path)
    reply = app(
        Message(ProfileRequest(SiteSpec()).to_record(), dst_node_id=7, message_type="query.profile"),
        _ctx(path, tmp_path),
    )
    assert reply.has_content() and not reply.has_error()
    assert "only one class ('sorted_B')" in caplog.text and "sorted population is fine" in caplog.text, caplog.text
