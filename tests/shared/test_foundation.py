"""Foundation-model alignment: a head on z learns an external embedding from obsm (real CITE-seq ADT here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from server.cli.single_site import distill_file, foundation_embedding
from shared.data import prepare_site, read_h5ad
from shared.distill import DistillConfig
from shared.errors import SiteDataError
from shared.fitting import TrainConfig, dense_rows
from shared.pretrain import PretrainConfig, pretrain

SMALL = PretrainConfig(vae=TrainConfig(steps=300, batch_size=128), scdg=TrainConfig(steps=100))


@pytest.fixture(scope="module")
def cbmc_subset(team_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 cells of the CBMC CITE-seq set; obsm['ADT'] (10 surface proteins) stands in for a foundation embedding."""
    adata = read_h5ad(team_data / "cbmc_citeseq_scdcc.h5ad")
    sub = adata[np.random.default_rng(0).permutation(adata.n_obs)[:600]].copy()
    sub.obsm["ADT"] = np.arcsinh(np.asarray(sub.obsm["ADT"], dtype=np.float32))
    path = tmp_path_factory.mktemp("cbmc") / "cbmc600.h5ad"
    sub.write_h5ad(path)
    return path


@pytest.mark.slow  # over 5 s: outside the fast tier
def test_aux_head_learns_the_embedding(cbmc_subset: Path) -> None:
    adata = read_h5ad(cbmc_subset)
    site = prepare_site(adata, label_key="cell_type", seed=0)
    aux = foundation_embedding(adata, site, "ADT")
    X = site.X[site.train_idx]
    assert aux.shape == (len(site.train_idx), 10)
    pre = pretrain(X, site.labels[site.train_idx], len(site.classes), SMALL, aux=aux)
    with torch.no_grad():
        pred = pre.vae.aux_head(pre.vae.encode(dense_rows(X, np.arange(X.shape[0])))[0]).numpy()
    r2 = 1 - ((pred - aux) ** 2).sum() / ((aux - aux.mean(0)) ** 2).sum()
    assert r2 > 0.3, r2


@pytest.mark.slow  # over 5 s: outside the fast tier
def test_distill_with_embedding_key_and_missing_key(cbmc_subset: Path) -> None:
    report = distill_file(
        cbmc_subset, distill=DistillConfig(k=2, iterations=5), n_genes=300, embedding_key="ADT", pretrain_cfg=SMALL
    )
    assert '"embedding_key": "ADT"' in report.synthetic.uns["fedscdd"]["provenance_json"]
    with pytest.raises(SiteDataError, match="obsm\\['X_scgpt'\\] not found"):
        distill_file(
            cbmc_subset,
            distill=DistillConfig(k=2, iterations=5),
            n_genes=300,
            embedding_key="X_scgpt",
            pretrain_cfg=SMALL,
        )
