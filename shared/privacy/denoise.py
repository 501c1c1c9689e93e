"""Denoising the sites' DP class means: post-processing of released statistics, no privacy cost.

Each site releases, once per run, per-class gene means with Gaussian noise of a known standard deviation
(``client.privacy.class_gene_sums``: the noise sd of a class's sum is public, so the sd of its mean is that over the
released count). Three ways to denoise them:

- ``soft_threshold_means`` (one site alone): each class's difference to the site's mean cell is soft-thresholded gene by
  gene at ``threshold`` x its noise sd. Most genes do not tell one class from another; their noised differences are
  noise, and only genes whose difference stands out of the noise keep it.
- ``joint_denoise`` (the coordinator, every site's release at once; run config ``dp-denoise = "joint"``): cell types
  differ along a few shared expression programmes, and the same class at several sites differs in the same genes. The
  matrix of every (site, class) difference, each row divided by its noise sd (so the noise is white), is low-rank
  signal plus white noise. Its singular directions above the largest singular value that white noise of that shape
  reaches (about sqrt(genes) + sqrt(rows)) are kept at their size; what they leave is soft-thresholded as one site
  alone would. With no direction above the edge this is exactly ``soft_threshold_means`` at every site.
- ``class_denoise`` (the coordinator; ``dp-denoise = "class"``): cell types are named alike at every site, so each
  class's means at the sites that released it are pooled (weighted by their inverse noise variance) after an additive
  site effect is taken out; the class effect, the site effects and each (site, class) rest are soft-thresholded at 1
  noise sd each. A small class at one site borrows its type's signal from the sites where that type is large. With
  one site it is exactly ``soft_threshold_means``.

Screened (``benchmarks/results/dp_curve.md``): offline (``benchmarks/dp_clip_screen.py DATA PLAN --joint``, a logistic
regression on cells drawn around the means) and in the federation, paired (``benchmarks/dp_denoise_pair.sh``, the same
DP noise in both arms). In the federation ``joint`` was ahead on validation cells at epsilon 8 (MLP / LR 0.854 / 0.869
against 0.838 / 0.847 over 9 runs of kang, cbmc and kidney) and behind at epsilon 4 and 2 (LR 0.789 against 0.799), so
the default stays site by site. Shrinking the kept directions (``shrink``: closer to the true means in squared error)
was worse in the federation at every epsilon below 8. ``class`` (a later release) was ahead at epsilon 8 (0.848 / 0.865
against 0.844 / 0.860) and behind at 4 (LR 0.826 against 0.837) and 2 (MLP 0.749 against 0.757): an option too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

SHRINK = 1.0  # the rest of a class's difference to its site's mean is soft-thresholded at this x its noise sd


def _soft(x: np.ndarray, t: np.ndarray | float) -> np.ndarray:
    return np.sign(x) * np.maximum(np.abs(x) - t, 0.0)


def soft_threshold_means(
    sums: np.ndarray, counts: np.ndarray, noise_sd: float, threshold: float = SHRINK
) -> np.ndarray:
    """(C, G) class means from one site's released class sums (noise of sd ``noise_sd`` per entry) and released counts;
    rows of unreleased classes (count 0) are 0, means are clipped at 0."""
    released = counts > 0
    out = np.zeros_like(sums, dtype=np.float64)
    if not released.any():
        return out
    n = np.maximum(counts[released], 1).astype(np.float64)[:, None]
    site_mean = sums[released].sum(0) / n.sum()
    diff = sums[released] / n - site_mean
    out[released] = np.maximum(site_mean + _soft(diff, threshold * noise_sd / n), 0.0)
    return out


def joint_denoise(
    means: Sequence[np.ndarray],
    counts: Sequence[np.ndarray],
    noise_sd: Sequence[float],
    threshold: float = SHRINK,
    *,
    shrink: bool = False,
) -> tuple[list[np.ndarray], int]:
    """Every site's denoised (C, G) class means from its raw released means (its noised class sums over its released
    counts; rows of classes with count 0 are ignored and come back 0), its counts and the noise sd of its sums; and the
    number of shared directions kept. Means are clipped at 0. The kept directions keep their size (the class
    differences along them are not pulled towards the site's mean); ``shrink`` shrinks their singular values to
    sqrt(s^2 - edge^2), which is closer to the truth in squared error and was worse in the federation."""
    rows: list[np.ndarray] = []
    row_sd: list[float] = []
    where: list[tuple[int, int]] = []
    centers: list[np.ndarray | None] = []
    for i, (m, n, sd) in enumerate(zip(means, counts, noise_sd, strict=True)):
        released = np.flatnonzero(np.asarray(n) > 0)
        if released.size == 0:
            centers.append(None)
            continue
        w = np.asarray(n, np.float64)[released]
        m = np.asarray(m, np.float64)
        center = (m[released] * w[:, None]).sum(0) / w.sum()  # the site's mean cell: its class sums over its cells
        centers.append(center)
        for c, nc in zip(released.tolist(), w.tolist(), strict=True):
            rows.append(m[c] - center)
            row_sd.append(sd / nc)
            where.append((i, c))
    out = [np.zeros(np.shape(m), np.float64) for m in means]
    if not rows:
        return out, 0
    D = np.asarray(rows)
    sds = np.asarray(row_sd, np.float64)
    if np.all(sds > 0):
        W = D / sds[:, None]  # white noise of sd 1 per entry
        U, s, Vt = np.linalg.svd(W, full_matrices=False)
        edge = math.sqrt(W.shape[1]) + math.sqrt(W.shape[0])
        kept: int = int((s > edge).sum())
        projected = (U[:, :kept] * s[:kept]) @ Vt[:kept]
        shrunk = (U[:, :kept] * np.sqrt(s[:kept] ** 2 - edge**2)) @ Vt[:kept] if shrink else projected
        D = (shrunk + _soft(W - projected, threshold)) * sds[:, None]
    else:  # no noise to remove (a test, or a site that released without noise)
        kept = 0
    for (i, c), row in zip(where, D, strict=True):
        out[i][c] = np.maximum(row + centers[i], 0.0)
    logger.info(
        "DP class means: %d rows of %d sites denoised together, %d shared directions kept", len(D), len(means), kept
    )
    return out, kept


def class_denoise(
    means: Sequence[np.ndarray],
    counts: Sequence[np.ndarray],
    noise_sd: Sequence[float],
    threshold: float = SHRINK,
) -> list[np.ndarray]:
    """Every site's denoised (C, G) class means, each class pooled over the sites that released it.

    Cell types are named the same at every site, so a class's mean at one site and at another differ by the sites'
    effects and noise. Per gene, an additive model ``mean[site, class] = class effect + site effect + rest`` is fitted
    by weighted least squares (weights: the inverse noise variance of each released mean, ``(count / noise_sd)^2``;
    the site effects cell-weighted to 0). Each part is soft-thresholded at ``threshold`` x its own noise
    sd: the class effect's difference to the overall mean cell (its noise falls with every site that has the class),
    the site effect, and each (site, class) rest. A class at one site only is thresholded against the overall mean
    cell instead of its site's. Inputs as ``joint_denoise``; means are clipped at 0; unreleased rows come back 0.
    """
    n_sites = len(means)
    if not len(counts) == len(noise_sd) == n_sites:
        msg = f"{n_sites} sites' means, {len(counts)} sites' counts and {len(noise_sd)} noise sds: one of each per site"
        raise ValueError(msg)
    out = [np.zeros(np.shape(m), np.float64) for m in means]
    if n_sites == 0:
        return out
    M = np.stack([np.asarray(m, np.float64) for m in means])  # (S, C, G)
    N = np.stack([np.asarray(n, np.float64) for n in counts])  # (S, C)
    sd = np.asarray(noise_sd, np.float64)
    given = N > 0
    if not given.any():
        return out
    if np.any(sd <= 0):  # no noise to remove: the releases are the means
        for i in range(n_sites):
            out[i][given[i]] = np.maximum(M[i][given[i]], 0.0)
        return out
    w = np.where(given, (N / sd[:, None]) ** 2, 0.0)  # inverse noise variance of each mean, per gene
    overall = (M * N[:, :, None]).sum((0, 1)) / N.sum()  # the mean cell over every released cell
    # weighted least squares, every gene at once (the weights do not depend on the gene): one row per released mean
    rows_i, rows_c = np.nonzero(given)
    A = np.zeros((rows_i.size, M.shape[1] + n_sites))
    A[np.arange(rows_i.size), rows_c] = 1.0
    A[np.arange(rows_i.size), M.shape[1] + rows_i] = 1.0
    root = np.sqrt(w[rows_i, rows_c])[:, None]
    theta = np.linalg.lstsq(A * root, M[rows_i, rows_c] * root, rcond=None)[0]
    cls, site = theta[: M.shape[1]], theta[M.shape[1] :]
    shift = (N.sum(1) / N.sum()) @ site  # the site effects cell-weighted to 0: the class effects are the average site's
    site, cls = site - shift, cls + shift
    wc, ws = w.sum(0), w.sum(1)  # (C,), (S,)
    has = wc > 0
    cls_sd = np.zeros(len(wc))
    cls_sd[has] = 1.0 / np.sqrt(wc[has])
    site_sd = 1.0 / np.sqrt(np.maximum(ws, 1e-300))
    cls_d = overall + _soft(cls - overall, threshold * cls_sd[:, None])
    site_d = _soft(site, threshold * site_sd[:, None])
    for i in range(n_sites):
        for c in np.flatnonzero(given[i]):
            rest_sd = math.sqrt(max(1.0 / w[i, c] - 1.0 / wc[c], 0.0))  # the rest's noise, less what the class shares
            rest = M[i, c] - cls[c] - site[i]
            out[i][c] = np.maximum(cls_d[c] + site_d[i] + _soft(rest, threshold * rest_sd), 0.0)
    logger.info("DP class means: %d classes pooled over %d sites", int(has.sum()), n_sites)
    return out


__all__ = ["SHRINK", "class_denoise", "joint_denoise", "soft_threshold_means"]
