"""Pretrain the latent space (VAE) and the generator (SCDG) on one pool of training cells."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from shared.models import SCDG, VAE, SCDGConfig, VAEConfig
from shared.training import TrainConfig, encode, fit_scdg, fit_vae, set_latent_stats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    """Model sizes and step budgets for pretraining."""

    latent_dim: int = 64
    vae: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1000, lr=1e-3, batch_size=128))
    scdg: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500, lr=1e-3, batch_size=256))
    seed: int = 0


@dataclass(frozen=True)
class Pretrained:
    """A trained VAE + SCDG pair and what training them cost."""

    vae: VAE
    scdg: SCDG
    vae_seconds: float
    scdg_seconds: float


def new_models(n_genes: int, n_classes: int, latent_dim: int, *, n_aux: int = 0) -> tuple[VAE, SCDG]:
    """Fresh VAE and SCDG for a gene and class vocabulary."""
    vae = VAE(VAEConfig(n_genes=n_genes, latent_dim=latent_dim, n_classes=n_classes, n_aux=n_aux))
    scdg = SCDG(SCDGConfig(latent_dim=latent_dim, n_classes=n_classes))
    return vae, scdg


def pretrain(X: sp.csr_matrix | np.ndarray, labels: np.ndarray, n_classes: int, cfg: PretrainConfig, *, aux: np.ndarray | None = None) -> Pretrained:
    """Train the VAE, then the SCDG on the VAE's latents, on pooled cells (labels: global ids)."""
    import torch

    torch.manual_seed(cfg.seed)
    vae, scdg = new_models(X.shape[1], n_classes, cfg.latent_dim, n_aux=0 if aux is None else aux.shape[1])
    t0 = time.perf_counter()
    fit_vae(vae, X, labels, cfg.vae, aux=aux)
    t1 = time.perf_counter()
    Z = encode(vae, X)
    set_latent_stats(scdg, Z.mean(0), Z.std(0))
    fit_scdg(scdg, Z, labels, cfg.scdg)
    t2 = time.perf_counter()
    logger.info("pretrained VAE (%d steps, %.1f s) and SCDG (%d steps, %.1f s) on %d cells", cfg.vae.steps, t1 - t0, cfg.scdg.steps, t2 - t1, X.shape[0])
    return Pretrained(vae, scdg, t1 - t0, t2 - t1)
