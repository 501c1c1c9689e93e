"""Baselines a site could upload instead of scDD codes: real-cell coresets, Gaussians, gene-space DM."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA

from shared.fitting import dense_rows

logger = logging.getLogger(__name__)

Matrix: TypeAlias = sp.csr_matrix | np.ndarray


@dataclass(frozen=True)
class SyntheticSet:
    """Cells (n, G) float32 with global class ids, and what producing them uploads."""

    X: np.ndarray
    labels: np.ndarray
    upload_bytes: int
    members: np.ndarray = field(
        default_factory=lambda: np.zeros(0, np.int64)
    )  # members[i]: the site's cell that seeded cell i (privacy audit)


def _features(X: np.ndarray, seed: int) -> np.ndarray:
    n_comp = min(50, X.shape[0] - 1, X.shape[1])
    if n_comp < 2:
        return X
    return PCA(n_components=n_comp, random_state=seed).fit_transform(X)


def _herding(F_: np.ndarray, k: int) -> list[int]:
    mu = F_.mean(0)
    chosen: list[int] = []
    acc = np.zeros_like(mu)
    for i in range(min(k, len(F_))):
        gaps = np.linalg.norm(mu - (acc + F_) / (i + 1), axis=1)
        gaps[chosen] = np.inf
        j = int(gaps.argmin())
        chosen.append(j)
        acc += F_[j]
    return chosen


def _kcenter(F_: np.ndarray, k: int) -> list[int]:
    first = int(np.linalg.norm(F_ - F_.mean(0), axis=1).argmin())
    chosen = [first]
    dist = np.linalg.norm(F_ - F_[first], axis=1)
    while len(chosen) < min(k, len(F_)):
        j = int(dist.argmax())
        chosen.append(j)
        dist = np.minimum(dist, np.linalg.norm(F_ - F_[j], axis=1))
    return chosen


def coreset(X: Matrix, labels: np.ndarray, k: int, *, method: str, seed: int = 0) -> SyntheticSet:
    """Pick up to k real cells per class: 'random', 'herding' or 'kcenter' (in a per-class PCA space)."""
    rng = np.random.default_rng(seed)
    picks: list[np.ndarray] = []
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        if method == "random" or len(pool) <= k:
            picks.append(rng.permutation(pool)[:k])
            continue
        feats = _features(dense_rows(X, pool).numpy(), seed)
        sel = _herding(feats, k) if method == "herding" else _kcenter(feats, k)
        if method not in ("herding", "kcenter"):
            msg = f"unknown coreset method {method!r}; expected random, herding or kcenter"
            raise ValueError(msg)
        picks.append(pool[sel])
    idx = np.concatenate(picks)
    cells = dense_rows(X, idx).numpy()
    return SyntheticSet(cells, labels[idx].astype(np.int64), cells.nbytes + 4 * len(idx), idx.astype(np.int64))


def gaussian(X: Matrix, labels: np.ndarray, k: int, *, seed: int = 0) -> SyntheticSet:
    """Per-class diagonal Gaussian (mean, variance uploaded), k cells sampled from it, clipped at 0."""
    rng = np.random.default_rng(seed)
    cells, ys, nbytes = [], [], 0
    for c in np.unique(labels):
        xc = dense_rows(X, np.flatnonzero(labels == c)).numpy()
        mu, sd = xc.mean(0), xc.std(0)
        cells.append(np.maximum(rng.normal(mu, sd, size=(k, xc.shape[1])), 0).astype(np.float32))
        ys.append(np.full(k, c))
        nbytes += 2 * mu.astype(np.float32).nbytes + 4
    return SyntheticSet(np.concatenate(cells), np.concatenate(ys).astype(np.int64), nbytes)


def distribution_matching(
    X: Matrix,
    labels: np.ndarray,
    k: int,
    *,
    iterations: int = 500,
    lr: float = 0.1,
    real_batch: int = 256,
    seed: int = 0,
) -> SyntheticSet:
    """DM in gene space (Zhao & Bilen 2023): real-initialised cells, random-network mean matching."""
    gen = torch.Generator().manual_seed(seed)
    init = coreset(X, labels, k, method="random", seed=seed)
    syn = torch.as_tensor(init.X).clone().requires_grad_(True)
    y_syn = torch.as_tensor(init.labels)
    opt = torch.optim.Adam([syn], lr=lr)
    classes = np.unique(labels)
    pools = {int(c): np.flatnonzero(labels == c) for c in classes}
    g = X.shape[1]
    for _ in range(iterations):
        w1 = torch.randn(g, 256, generator=gen) / g**0.5
        w2 = torch.randn(256, 128, generator=gen) / 16.0
        loss = syn.new_zeros(())
        for c, pool in pools.items():
            idx = pool[torch.randint(len(pool), (min(real_batch, len(pool)),), generator=gen).numpy()]
            er = F.relu(dense_rows(X, idx) @ w1) @ w2
            es = F.relu(syn[y_syn == c] @ w1) @ w2
            loss = loss + ((er.mean(0) - es.mean(0)) ** 2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            syn.clamp_(min=0)
    cells = syn.detach().numpy().astype(np.float32)
    return SyntheticSet(cells, init.labels, cells.nbytes + 4 * len(init.labels), init.members)
