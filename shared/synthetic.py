"""Synthetic cells as AnnData: scanpy-ready (X log-normalised), labelled, with provenance."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def to_anndata(
    X: np.ndarray,
    labels: np.ndarray,
    *,
    class_names: Sequence[str],
    genes: Sequence[str],
    label_key: str = "cell_type",
    site: str | Sequence[str] = "site",
    round_: int | None = None,
    provenance: dict[str, Any] | None = None,
    layers: dict[str, np.ndarray] | None = None,
) -> ad.AnnData:
    """Build an AnnData of synthetic cells (X and ``layers`` sparse float32; obs: label, site, synthetic[, round])."""
    names = np.asarray(class_names, dtype=object)
    sites = np.asarray([site] * len(labels) if isinstance(site, str) else list(site), dtype=object)
    obs = pd.DataFrame(
        {
            label_key: pd.Categorical(names[labels], categories=list(class_names)),
            "site": pd.Categorical(sites),
            "synthetic": np.ones(len(labels), dtype=bool),
        },
        index=[f"synthetic-{i}" for i in range(len(labels))],
    )
    if round_ is not None:
        obs["round"] = np.full(len(labels), round_, dtype=np.int64)
    adata = ad.AnnData(
        X=sp.csr_matrix(np.asarray(X, dtype=np.float32)),
        obs=obs,
        var=pd.DataFrame(index=list(genes)),
        layers={k: sp.csr_matrix(np.asarray(v, dtype=np.float32)) for k, v in (layers or {}).items()},
    )
    adata.uns["fedscdd"] = {"provenance_json": json.dumps(provenance or {}, sort_keys=True, default=str)}
    return adata


def fuse(parts: Sequence[ad.AnnData]) -> ad.AnnData:
    """Concatenate synthetic AnnDatas of several sites (same genes) into one, fresh obs names."""
    if not parts:
        msg = "nothing to fuse: no site contributed synthetic cells"
        raise ValueError(msg)
    fused = ad.concat(list(parts), join="outer", merge="first", uns_merge="first")
    fused.obs_names = [f"synthetic-{i}" for i in range(fused.n_obs)]
    for col in ("site",):
        fused.obs[col] = fused.obs[col].astype("category")
    return fused


def provenance(adata: ad.AnnData) -> dict[str, Any]:
    """Read back the provenance dict written by `to_anndata`."""
    raw = adata.uns.get("fedscdd", {}).get("provenance_json", "{}")
    return dict(json.loads(raw))
