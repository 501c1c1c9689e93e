"""Pretraining under DP without DP-SGD (run config ``dp-pretraining = "statistics"``, the DP default).

Each site releases its per-class gene means once: a Gaussian mechanism on clipped cells
(``client.privacy.class_gene_means``), the very release its distillation matches later (the noise
is keyed by run, site and release, so the second use costs nothing), with the noised cell counts
its profile already released. The server denoises the releases (``shared.privacy.denoise``, run
config ``dp-denoise``: each site's alone, all together, or each class over the sites), draws cells around
every denoised mean and trains the VAE and the SCDG on them as pooled pretraining, and sends each site its
denoised means for its distillation: post-processing of released statistics, no further privacy cost and no model update
leaving a site.

Why not DP-SGD: at sites of a few hundred to a few thousand cells the noise that DP-SGD needs for a
useful epsilon drowns the models' gradients (kang at epsilon 8: 0.23 accuracy, chance is 0.2), while
one release of C x G means keeps most of the class signal (benchmarks/results/dp_curve.md).

The models get no count head here (no released statistic teaches one): under this mode
``synthetic.h5ad`` has no ``layers["counts"]``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import scipy.sparse as sp

from server.config import FederationConfig
from server.errors import NOTHING_RELEASED, FederationStopped
from server.fedavg import StageBudget, budgets, stage_round
from server.messaging import Link
from server.synthesis import fresh_models
from shared.fitting import TrainConfig, encode, fit_scdg, fit_vae, set_latent_stats
from shared.models import SCDG, VAE
from shared.models.vae import CELL_VAR_RATIO, LOG_MAX
from shared.pretrain import PretrainConfig
from shared.privacy import mechanisms as mech
from shared.privacy.denoise import class_denoise, joint_denoise, soft_threshold_means
from shared.protocol import Plan

logger = logging.getLogger(__name__)

MIN_CELLS = 5  # a (site, class) mean released from fewer (noised) cells is not drawn from (as client.privacy)
MAX_CELLS = 50_000  # cells drawn in all; above, every mean gets its share
# Within-class variance of a gene's log-normalised expression, as a share of its mean (shared.models.vae's public cell
# model: no released statistic describes the spread of one class at one site). Offline on validation cells (epsilon
# 8, raw released means, a logistic regression on the drawn cells), 0.5 x mean vs no spread at all: kang 0.761 vs
# 0.761, cbmc 0.781 vs 0.802, kidney 0.884 vs 0.879; the spread keeps the VAE from training on a handful of points.
VAR_RATIO = CELL_VAR_RATIO


def draw_cells(
    means: list[np.ndarray], counts: list[np.ndarray], *, seed: int, max_cells: int = MAX_CELLS
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Cells drawn around every site's released class means: one per released cell of each (site, class) with at least
    MIN_CELLS, scaled down to ``max_cells`` in all; (cells x genes CSR, plan class ids)."""
    rng = np.random.default_rng(seed)
    jobs = [
        (m[c], int(n[c]), int(c)) for m, n in zip(means, counts, strict=True) for c in np.flatnonzero(n >= MIN_CELLS)
    ]
    if not jobs:
        raise FederationStopped(NOTHING_RELEASED, f"no class with at least {MIN_CELLS} released cells at any site")
    scale = min(1.0, max_cells / sum(n for _, n, _ in jobs))
    blocks, labels = [], []
    for mean, n, c in jobs:
        size = max(MIN_CELLS, round(n * scale))
        mu = np.clip(mean.astype(np.float64), 0.0, LOG_MAX)
        x = mu + np.sqrt(VAR_RATIO * mu) * rng.standard_normal((size, mu.shape[0]))
        blocks.append(sp.csr_matrix(np.clip(x, 0.0, LOG_MAX).astype(np.float32)))
        labels.append(np.full(size, c, np.int64))
    return sp.vstack(blocks, format="csr"), np.concatenate(labels)


def released_means(
    link: Link, plan: Plan, cfg: FederationConfig, latent_dim: int, noise: Mapping[str, float]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """Every site's one release of its class means (``train.pretrain`` stage "class-means"), denoised as
    ``dp-denoise`` says: per site, its (C, G) means and (C,) released counts; and what the denoising did.

    ``noise``: per site, the noise multiplier of its class means (``server.privacy.privacy_plan``, computed from the
    counts the site released, as the site computes it). Asking again (a resumed run) gets the same numbers: the request
    is the same (an untrained VAE seeded by the run) and a site's noise is keyed by the release."""
    vae, _ = fresh_models(plan, latent_dim=latent_dim, seed=cfg.seed)
    release = StageBudget(0, budgets(cfg)[0].lr, 1)  # no steps: the request names the plan, the reply holds the release
    replies = stage_round(link, plan, "class-means", 0, vae, release, seed=cfg.seed, latent_dim=latent_dim)
    bound = mech.class_sums_bound(plan.center)
    raw = [np.asarray(r.payload.class_means, np.float64) for r in replies]
    counts = [np.asarray(r.payload.class_counts, np.int64) for r in replies]
    sds = [noise[r.site] * bound for r in replies]
    if cfg.dp_denoise == "joint":
        means, kept = joint_denoise(raw, counts, sds)
    elif cfg.dp_denoise == "class":
        means, kept = class_denoise(raw, counts, sds), 0
    else:
        means = [soft_threshold_means(m * n[:, None], n, sd) for m, n, sd in zip(raw, counts, sds, strict=True)]
        kept = 0
    sites = [r.site for r in replies]
    info = {"mode": cfg.dp_denoise, "shared_directions": kept}
    return (
        {site: m.astype(np.float32) for site, m in zip(sites, means, strict=True)},
        dict(zip(sites, counts, strict=True)),
        info,
    )


def statistics_pretrain(
    link: Link, plan: Plan, cfg: FederationConfig, latent_dim: int, noise: Mapping[str, float]
) -> tuple[VAE, SCDG, dict[str, Any], dict[str, np.ndarray]]:
    """Ask every site for its released class means, train a fresh VAE + SCDG on cells drawn around them (denoised:
    ``released_means``); the models, the run's pretraining metrics and the denoised means per site (the distillation
    matches them)."""
    t0 = time.perf_counter()
    vae, scdg = fresh_models(plan, latent_dim=latent_dim, seed=cfg.seed)
    vae_cfg, scdg_cfg = server_budgets(cfg)
    means, counts, denoise = released_means(link, plan, cfg, latent_dim, noise)
    X, y = draw_cells(list(means.values()), list(counts.values()), seed=cfg.seed)
    t1 = time.perf_counter()
    fit_vae(vae, X, y, vae_cfg)
    vae.eval()
    Z = encode(vae, X)
    set_latent_stats(scdg, Z.mean(0), Z.std(0))
    fit_scdg(scdg, Z, y, scdg_cfg)
    scdg.eval()
    t2 = time.perf_counter()
    logger.info(
        "pretrained under DP on released class means: %d sites, %d drawn cells, VAE %d and SCDG %d steps in %.1f s",
        len(means),
        X.shape[0],
        vae_cfg.steps,
        scdg_cfg.steps,
        t2 - t1,
    )
    history = {
        "source": "dp-statistics",
        "sites": list(means),
        "drawn_cells": int(X.shape[0]),
        "denoise": denoise,
        "schedule": {"vae_steps": vae_cfg.steps, "scdg_steps": scdg_cfg.steps, "var_ratio": VAR_RATIO},
        "seconds": {"release": t1 - t0, "train": t2 - t1},
    }
    return vae, scdg, history, means


def server_budgets(cfg: FederationConfig) -> tuple[TrainConfig, TrainConfig]:
    """The server's VAE and SCDG training: as many steps as one site would take in FedAvg (rounds x local steps; the
    defaults give the pooled budget, 3000 / 1500), at the run's learning rates and batch sizes, seeded by the run."""
    pre = PretrainConfig().with_seed(cfg.seed)
    vae, scdg = budgets(cfg)
    return (
        replace(pre.vae, steps=cfg.num_pretrain_rounds * vae.steps, lr=vae.lr, batch_size=vae.batch_size),
        replace(pre.scdg, steps=cfg.num_pretrain_rounds * scdg.steps, lr=scdg.lr, batch_size=scdg.batch_size),
    )


__all__ = ["MIN_CELLS", "draw_cells", "released_means", "server_budgets", "statistics_pretrain"]
