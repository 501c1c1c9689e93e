"""The single-site path of `scdd distill`: one .h5ad in, a synthetic .h5ad out, with numbers."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np

from shared.checkpoint import model_hash
from shared.counts import library_stats, sample_counts
from shared.data import Expect, PreparedSite, prepare_site, read_h5ad
from shared.distill import DECODE_MODE, DistillConfig, distill_codes, generate, latents
from shared.errors import SiteDataError
from shared.evaluation import fit_predict, score
from shared.pretrain import PretrainConfig, pretrain
from shared.sites import prepare_federation
from shared.synthetic import to_anndata

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillReport:
    """What `distill_file` did and measured."""

    n_train: int
    n_test: int
    n_genes: int
    n_classes: int
    pretrain_seconds: float
    distill_seconds: float
    code_bytes: int
    real_bytes: int
    accuracy_synthetic: float
    accuracy_real: float
    synthetic: ad.AnnData = field(repr=False)

    def summary(self) -> str:
        """Human-readable lines for the CLI."""
        return "\n".join(
            [
                f"cells: {self.n_train} train / {self.n_test} held-out, {self.n_genes} genes, {self.n_classes} classes",
                f"pretraining (VAE + SCDG on this site's training cells): {self.pretrain_seconds:.1f} s",
                f"distillation: {self.distill_seconds:.1f} s -> {self.synthetic.n_obs} synthetic cells",
                f"codes: {self.code_bytes} bytes "
                f"(the same cells as float32 genes: {self.real_bytes} bytes of real training data)",
                f"MLP held-out accuracy: {self.accuracy_synthetic:.3f} trained on synthetic cells "
                f"vs {self.accuracy_real:.3f} on all real training cells",
            ]
        )


def distill_file(
    path: str | Path,
    *,
    label_key: str = "cell_type",
    expect: Expect = "auto",
    n_genes: int = 2000,
    distill: DistillConfig | None = None,
    pretrain_cfg: PretrainConfig | None = None,
    embedding_key: str | None = None,
    seed: int = 0,
) -> DistillReport:
    """Prepare one site, pretrain VAE + SCDG on its training cells, distill codes, decode, evaluate."""
    distill = distill or DistillConfig(seed=seed)
    pretrain_cfg = pretrain_cfg or PretrainConfig(seed=seed)
    adata = read_h5ad(path)
    prepare_site(adata, label_key=label_key, expect=expect, seed=seed)  # fail fast with the contract's message
    fed = prepare_federation({Path(path).stem: adata}, label_key=label_key, n_genes=n_genes, seed=seed)
    X_tr, y_tr = fed.train(0)
    X_te, y_te = fed.test(0)
    n_classes = len(fed.classes)
    aux = foundation_embedding(adata, fed.sites[0], embedding_key) if embedding_key else None
    site = fed.sites[0]
    library = site.library[site.train_idx] if site.library is not None else None
    pre = pretrain(X_tr, y_tr, n_classes, pretrain_cfg, aux=aux, library=library)
    t0 = time.perf_counter()
    codes = distill_codes(pre.vae, pre.scdg, X_tr, y_tr, distill)
    cells = generate(pre.vae, pre.scdg, codes, mode=DECODE_MODE, seed=seed)
    layers = {"expected": cells}
    if library is not None:  # count input: sampled counts on the input's scale, as a federation writes them
        layers["counts"], _ = sample_counts(
            pre.vae, latents(pre.scdg, codes), codes.labels, library_stats(X_tr, library, y_tr, n_classes), seed=seed
        )
    seconds = time.perf_counter() - t0
    acc_syn = score(y_te, fit_predict("mlp", cells, codes.labels, X_te, n_classes, seed=seed)).accuracy
    acc_real = score(y_te, fit_predict("mlp", X_tr, y_tr, X_te, n_classes, seed=seed)).accuracy
    prov = {
        "embedding_key": embedding_key,
        "method": "scdd",
        "distill": distill.__dict__,
        "t_star": codes.t_star,
        "vae_hash": model_hash(pre.vae),
        "scdg_hash": model_hash(pre.scdg),
        "source": Path(path).name,
    }
    synth = to_anndata(
        cells,
        codes.labels,
        class_names=fed.classes,
        genes=fed.genes,
        label_key=label_key,
        site=fed.names[0],
        provenance=prov,
        layers=layers,
    )
    return DistillReport(
        n_train=X_tr.shape[0],
        n_test=X_te.shape[0],
        n_genes=len(fed.genes),
        n_classes=n_classes,
        pretrain_seconds=pre.vae_seconds + pre.scdg_seconds,
        distill_seconds=seconds,
        code_bytes=codes.nbytes,
        real_bytes=int(X_tr.shape[0] * len(fed.genes) * 4),
        accuracy_synthetic=acc_syn,
        accuracy_real=acc_real,
        synthetic=synth,
    )


def foundation_embedding(adata: ad.AnnData, site: PreparedSite, key: str) -> np.ndarray:
    """The training cells' rows of `adata.obsm[key]` (an external foundation-model embedding), standardised."""
    if key not in adata.obsm:
        msg = (
            f"obsm[{key!r}] not found; available obsm keys: {sorted(adata.obsm)}; "
            "compute the embedding with its own tool (scGPT, Geneformer, UCE, ...) and store it there"
        )
        raise SiteDataError(msg)
    emb = np.asarray(
        adata.obsm[key].toarray() if hasattr(adata.obsm[key], "toarray") else adata.obsm[key], dtype=np.float32
    )
    if emb.ndim != 2 or not np.isfinite(emb).all():
        msg = (
            f"obsm[{key!r}] must be a finite 2-D array (cells x dims); "
            f"got ndim={emb.ndim} with non-finite entries={int((~np.isfinite(emb)).sum())}"
        )
        raise SiteDataError(msg)
    assert site.rows is not None
    rows = emb[site.rows][site.train_idx]
    return (rows - rows.mean(0)) / np.maximum(rows.std(0), 1e-6)


def class_counts(labels: np.ndarray) -> dict[int, int]:
    """Cells per class id."""
    ids, counts = np.unique(labels, return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts, strict=True)}
