"""Pretrain the latent space (VAE) and the generator (SCDG) on one pool of training cells."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from shared.fitting import TrainConfig, encode, fit_scdg, fit_vae, set_latent_stats
from shared.models import SCDG, VAE, SCDGConfig, VAEConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    """Model sizes and step budgets for pretraining."""

    latent_dim: int | None = None  # None: chosen from the gene count (`latent_dim_for`)
    # 3000 VAE steps, not 1000 or 5000: benchmarks/results/design_choices.md
    vae: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3000, lr=1e-3, batch_size=128))
    scdg: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500, lr=1e-3, batch_size=256))
    seed: int = 0

    def with_seed(self, seed: int) -> PretrainConfig:
        """The same budgets with every seed (initialisation, VAE and SCDG minibatches) set to ``seed``."""
        return replace(self, seed=seed, vae=replace(self.vae, seed=seed), scdg=replace(self.scdg, seed=seed))


@dataclass(frozen=True)
class Pretrained:
    """A trained VAE + SCDG pair and what training them cost."""

    vae: VAE
    scdg: SCDG
    vae_seconds: float
    scdg_seconds: float


MAX_LATENT_DIM = 64
MIN_LATENT_DIM = 8
UPLOAD_RATIO = 20  # a code (d floats + a label) is at most 1/20 of a cell (G floats + a label)


def latent_dim_for(n_genes: int) -> int:
    """Latent size for a gene vocabulary: 64, or less so that a code uploads <= 1/20 of a cell's bytes.

    A code is d float32 values and an int32 label, a real or gene-space synthetic cell G float32
    values and a label: d = (G + 1) // 20 - 1 keeps the ratio at 20 or more down to G = 179 genes,
    below which d stays at 8.
    """
    return max(MIN_LATENT_DIM, min(MAX_LATENT_DIM, (n_genes + 1) // UPLOAD_RATIO - 1))


def new_models(
    n_genes: int,
    n_classes: int,
    latent_dim: int,
    *,
    n_aux: int = 0,
    count_head: bool = False,
    site_dim: int = 0,
) -> tuple[VAE, SCDG]:
    """Fresh VAE (with a count head for count input, a site vector of ``site_dim``) and SCDG for a gene and class
    vocabulary."""
    vae = VAE(
        VAEConfig(
            n_genes=n_genes,
            latent_dim=latent_dim,
            n_classes=n_classes,
            n_aux=n_aux,
            count_head=count_head,
            site_dim=site_dim,
        )
    )
    scdg = SCDG(SCDGConfig(latent_dim=latent_dim, n_classes=n_classes))
    return vae, scdg


def pretrain(
    X: sp.csr_matrix | np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    cfg: PretrainConfig,
    *,
    aux: np.ndarray | None = None,
    library: np.ndarray | None = None,
) -> Pretrained:
    """Train the VAE, then the SCDG on the VAE's latents, on pooled cells (labels: global ids).

    ``library`` (count input: each cell's total counts over all genes) adds and trains the VAE's count head.
    """
    import torch

    torch.manual_seed(cfg.seed)
    latent_dim = cfg.latent_dim or latent_dim_for(X.shape[1])
    vae, scdg = new_models(
        X.shape[1], n_classes, latent_dim, n_aux=0 if aux is None else aux.shape[1], count_head=library is not None
    )
    t0 = time.perf_counter()
    fit_vae(vae, X, labels, cfg.vae, aux=aux, library=library)
    t1 = time.perf_counter()
    Z = encode(vae, X)
    set_latent_stats(scdg, Z.mean(0), Z.std(0))
    fit_scdg(scdg, Z, labels, cfg.scdg)
    t2 = time.perf_counter()
    logger.info(
        "pretrained VAE (%d steps, %.1f s) and SCDG (%d steps, %.1f s) on %d cells",
        cfg.vae.steps,
        t1 - t0,
        cfg.scdg.steps,
        t2 - t1,
        X.shape[0],
    )
    return Pretrained(vae, scdg, t1 - t0, t2 - t1)
