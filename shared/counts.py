"""Synthetic counts: the per-class library statistics a site releases, and counts sampled from the VAE's count head.

A real cell of count input is stored as ``X = log1p(counts / L * TARGET_SUM)`` over the plan genes, where
``L`` is its total over ALL its genes (``shared.data.normalize`` normalises before the plan keeps its
genes). A synthetic cell must be on the same scale, so it needs both a total ``L`` and the share ``f`` of
it that falls on the plan genes. Per class, a site releases three aggregates of its training cells: the
mean and standard deviation of ``log L`` and the mean of ``f``. The server draws ``log L`` from that
normal, takes ``l = f * L`` as the plan genes' total, draws each gene's count from the count head's
negative binomial with mean ``l * rho_g`` and writes ``X = log1p(counts / L * TARGET_SUM)``.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import scipy.sparse as sp
import torch

from shared.data import TARGET_SUM
from shared.models.likelihood import sample_nb
from shared.models.vae import VAE
from shared.protocol.rounds import LIBRARY_STATS

Matrix: TypeAlias = sp.csr_matrix | np.ndarray
BLOCK_ROWS = 8192


def plan_fraction(X: Matrix) -> np.ndarray:
    """Per cell, the share of its total counts on the columns of ``X`` (log-normalised rows of count input)."""
    if sp.issparse(X):  # a block of rows at a time: a site's matrix is not copied whole
        X = sp.csr_matrix(X)
        parts = []
        for a in range(0, X.shape[0], BLOCK_ROWS):
            rows = X[a : a + BLOCK_ROWS]
            rows.data = np.expm1(rows.data.astype(np.float64))
            parts.append(np.asarray(rows.sum(axis=1)).ravel())
        total = np.concatenate(parts) if parts else np.zeros(0)
    else:
        total = np.expm1(np.asarray(X, dtype=np.float64)).sum(axis=1)
    return total / TARGET_SUM


MIN_CELLS = (
    5  # a statistic over fewer cells would come close to describing one cell: such classes get the site's pooled row
)


def library_stats(
    X: Matrix, library: np.ndarray, labels: np.ndarray, n_classes: int, *, min_cells: int = MIN_CELLS
) -> np.ndarray:
    """(n_classes, 3) float32: per class mean and sd of log total counts, mean plan share; NaN rows for absent classes.

    A class with fewer than ``min_cells`` cells gets the row of all the site's cells together, so that no
    released number is computed from fewer than ``min_cells`` cells (all NaN when the site has fewer).
    """
    out = np.full((n_classes, LIBRARY_STATS), np.nan, dtype=np.float32)
    if labels.size < min_cells:
        return out
    log_l = np.log(np.maximum(np.asarray(library, dtype=np.float64), 1.0))
    share = np.clip(plan_fraction(X), 1e-6, 1.0)
    pooled = (log_l.mean(), log_l.std(), share.mean())
    for c in np.unique(labels):
        m = labels == c
        out[c] = (log_l[m].mean(), log_l[m].std(), share[m].mean()) if m.sum() >= min_cells else pooled
    return out


def usable(stats: np.ndarray, labels: np.ndarray) -> bool:
    """True when ``stats`` has a finite row for every class among ``labels``."""
    return stats.ndim == 2 and bool(np.isfinite(stats[np.unique(labels)]).all())


@torch.no_grad()
def sample_counts(
    vae: VAE, z: np.ndarray, labels: np.ndarray, stats: np.ndarray, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Counts (n, G) sampled for latents ``z`` of classes ``labels``, and their log-normalised X on the real cells'
    scale."""
    if vae.count_head is None:
        msg = "this VAE has no count head (it was trained without count input): synthetic counts are not available"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    rho, theta = vae.count_head.parts(torch.as_tensor(z, dtype=torch.float32))
    mean_log, sd_log, share = (stats[labels, j].astype(np.float64) for j in range(LIBRARY_STATS))
    total = np.exp(rng.normal(mean_log, sd_log))  # L: the cell's total over all genes
    mu = rho.numpy().astype(np.float64) * (share * total)[:, None]
    counts = sample_nb(mu, theta.numpy(), rng)
    X = np.log1p(counts / total[:, None] * TARGET_SUM).astype(np.float32)
    return counts, X
