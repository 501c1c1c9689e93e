"""Federated pretraining of the latent VAE and the SCDG: FedAvg rounds of local steps, one latent-moments round.

Schedule: ``num-pretrain-rounds`` rounds of ``vae-local-steps`` VAE steps at every site, a
latent-stats round (pooled per-dimension mean/std of the encoder's latents, for the SCDG's
standardisation), then ``num-pretrain-rounds`` rounds of ``scdg-local-steps`` SCDG steps.
How updates are combined (``server-optimizer``, ``class-aware-aggregation``) is
``server.aggregation``; ``proximal-mu`` travels to the sites (FedProx); ``drift-control = "scaffold"`` keeps the
server's SCAFFOLD control variate here (``update_control``) and sends it with every round.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from flwr.app import RecordDict

from server.aggregation import DEFAULT_SERVER_LR, ServerOptimizer, average
from server.averaging import latent_moments
from server.config import FederationConfig
from server.messaging import Link, SiteReply
from server.validation import decode, validate_pretrain
from shared.checkpoint import load_state, model_json, state_of
from shared.drift import zero_controls
from shared.fitting import set_latent_stats
from shared.models import SCDG, VAE
from shared.models.vae import SITE_KEY
from shared.pretrain import PretrainConfig
from shared.protocol import MSG_PRETRAIN, Plan, PretrainReply, PretrainRequest, Stage, StateDict

logger = logging.getLogger(__name__)

VAE_WARMUP = (
    0.3  # the KL weight warms up over this share of ALL VAE steps (rounds x local steps), as in pooled training
)


def kl_ramp(rnd: int, rounds: int, warmup: float = VAE_WARMUP) -> tuple[float, float]:
    """KL weight at the start and end of VAE round ``rnd`` (1-based) of ``rounds``: a warm-up over ``warmup`` of all
    steps."""
    warm = max(warmup * rounds, 1e-9)
    return min(1.0, (rnd - 1) / warm), min(1.0, rnd / warm)


LR_FLOOR = 0.1  # "cosine" local-lr-decay ends at this share of the stage's learning rate


def local_lr(lr: float, rnd: int, rounds: int, schedule: str) -> float:
    """The sites' learning rate in round ``rnd`` (1-based) of ``rounds``: ``lr`` throughout ("none"), or a cosine from
    ``lr`` in round 1 to ``LR_FLOOR * lr`` in the last round ("cosine"; FedAvg's drift under label skew shrinks with
    the local step size)."""
    if schedule == "none" or rounds <= 1:
        return lr
    progress = (rnd - 1) / (rounds - 1)
    return lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class SiteOptions:
    """How the sites train locally beyond their budget: the PretrainRequest fields of the same names."""

    proximal_mu: float = 0.0  # FedProx
    keep_optimizer: bool = False  # site-optimizer-state = "keep"
    balanced_heads: bool = False  # balanced-class-heads

    @classmethod
    def of(cls, cfg: FederationConfig) -> SiteOptions:
        """The run config's options."""
        return cls(cfg.proximal_mu, cfg.site_optimizer_state == "keep", cfg.balanced_class_heads)


@dataclass(frozen=True)
class StageBudget:
    """Local optimisation budget of one stage."""

    steps: int
    lr: float
    batch_size: int


def budgets(cfg: FederationConfig) -> tuple[StageBudget, StageBudget]:
    """VAE and SCDG budgets: steps from the run config, lr/batch from it or from PretrainConfig's defaults."""
    pre = PretrainConfig()
    vae = StageBudget(
        cfg.vae_local_steps,
        pre.vae.lr if cfg.pretrain_lr is None else cfg.pretrain_lr,
        cfg.vae_batch_size,
    )
    scdg = StageBudget(
        cfg.scdg_local_steps,
        pre.scdg.lr if cfg.pretrain_lr is None else cfg.pretrain_lr,
        cfg.scdg_batch_size,
    )
    return vae, scdg


def site_seed(base: int, link: Link, node: int, salt: int) -> int:
    """Deterministic per-site seed: base + 1000 * (index of the site name) + salt."""
    names = sorted(set(link.nodes.values()))
    return base + 1000 * names.index(link.name(node)) + salt


def with_site_vector(state: StateDict, vectors: Mapping[str, np.ndarray], site: str) -> StateDict:
    """A VAE state dict with ``site``'s own site vector in place of the average (unchanged without one): what the
    server sends a site under ``site-covariate``."""
    if SITE_KEY not in state or site not in vectors:
        return state
    return {**state, SITE_KEY: np.asarray(vectors[site], dtype=state[SITE_KEY].dtype)}


def start_site_vectors(vectors: dict[str, np.ndarray], link: Link, dim: int, *, seed: int) -> None:
    """A standard-normal site vector for every connected site that has none yet (seeded per site): distinct from the
    first step, as scVI's one-hot batch covariate is, rather than all sites starting from the same zeros."""
    for node in sorted(link.nodes):
        name = link.name(node)
        if name not in vectors:
            rng = np.random.default_rng(site_seed(seed, link, node, 0))
            vectors[name] = rng.standard_normal(dim).astype(np.float32)


def stage_round(
    link: Link,
    plan: Plan,
    stage: Stage,
    rnd: int,
    model: Any,
    budget: StageBudget,
    *,
    seed: int,
    ramp: tuple[float, float] = (1.0, 1.0),
    encoder: VAE | None = None,
    latent_dim: int,
    options: SiteOptions = SiteOptions(),
    site_vectors: Mapping[str, np.ndarray] | None = None,
    control: StateDict | None = None,
) -> list[SiteReply[PretrainReply]]:
    """Send one stage round to every site; return the validated replies (sorted by site).

    ``site_vectors``: each site's VAE site vector (``site-covariate``), put into the VAE (or the SCDG stage's
    encoder) that site receives. ``control``: the server's SCAFFOLD control variate (``drift-control``)."""
    sent, enc = state_of(model), state_of(encoder) if encoder is not None else None
    own = site_vectors or {}
    requests = {
        node: PretrainRequest(
            stage,
            rnd,
            with_site_vector(sent, own, link.name(node)) if stage != "scdg" else sent,
            model_json(model),
            plan,
            budget.steps,
            budget.lr,
            budget.batch_size,
            ramp,
            site_seed(seed, link, node, rnd),
            encoder=with_site_vector(enc, own, link.name(node)) if enc is not None else None,
            encoder_config=model_json(encoder) if encoder is not None else "",
            control=control,
            **dataclasses.asdict(options),
        )
        for node in sorted(link.nodes)
    }

    def check(node: int, content: RecordDict, wire: int) -> PretrainReply:
        reply = decode(content, PretrainReply)
        validate_pretrain(reply, requests[node], latent_dim=latent_dim)
        return reply

    contents = {node: req.to_record() for node, req in requests.items()}
    return link.exchange(MSG_PRETRAIN, contents, f"pretrain-{stage}-{rnd}", check)


def update_control(control: StateDict, replies: list[SiteReply[PretrainReply]]) -> StateDict:
    """SCAFFOLD's server variate after a round: plus the cell-weighted mean of the sites' changes of their own, which
    keeps it the cell-weighted mean of the sites' variates while every site replies (FedAvg weighs the same way)."""
    if not replies:
        return control
    weights = np.array([r.payload.num_examples for r in replies], dtype=np.float64)
    share = weights / weights.sum()
    deltas = [cast(StateDict, r.payload.control_delta) for r in replies]  # validated: present, same keys and shapes
    return {
        name: (value + sum(w * d[name].astype(np.float64) for w, d in zip(share, deltas, strict=True))).astype(
            np.float32
        )
        for name, value in control.items()
    }


def optimizer_for(cfg: FederationConfig, model: Any) -> ServerOptimizer:
    """The run's server optimiser for one model (its own moments; trainable parameters only)."""
    lr = DEFAULT_SERVER_LR[cfg.server_optimizer] if cfg.server_lr is None else cfg.server_lr
    return ServerOptimizer(cfg.server_optimizer, lr, params=frozenset(name for name, _ in model.named_parameters()))


def _combine(
    model: Any,
    replies: list[SiteReply[PretrainReply]],
    opt: ServerOptimizer,
    cfg: FederationConfig,
    site_classes: Mapping[str, Collection[int]] | None,
) -> float:
    """Aggregate one stage round into ``model`` in place; return the cell-weighted mean of the sites' last losses."""
    current = state_of(model)
    weights = [r.payload.num_examples for r in replies]
    by_class = (
        [site_classes.get(r.site, ()) for r in replies]
        if cfg.class_aware_aggregation and site_classes is not None
        else None
    )
    avg = average(
        [cast(StateDict, r.payload.weights) for r in replies],  # a decoded vae/scdg reply carries its weights
        weights,
        site_classes=by_class,
        class_rows=model.class_rows,
        n_classes=model.config.n_classes,
        previous=current,
    )
    load_state(model, opt.step(current, avg))
    return sum(r.payload.loss * n for r, n in zip(replies, weights, strict=True)) / sum(weights)


def _stage_rounds(
    link: Link,
    plan: Plan,
    cfg: FederationConfig,
    site_classes: Mapping[str, Collection[int]] | None,
    stage: Stage,
    model: VAE | SCDG,
    budget: StageBudget,
    *,
    seed: int,
    latent_dim: int,
    encoder: VAE | None = None,
    site_vectors: dict[str, np.ndarray],
) -> list[float]:
    """``num-pretrain-rounds`` rounds of one model (the VAE's KL weight ramps up over them); each round's loss.

    ``site_vectors`` (site-covariate): each site's VAE site vector, sent to it and updated from its VAE replies."""
    opt = optimizer_for(cfg, model)
    if isinstance(model, VAE) and model.site_embedding is not None:
        start_site_vectors(site_vectors, link, model.config.site_dim, seed=seed)
    control = zero_controls(model) if cfg.drift_control == "scaffold" else None
    losses = []
    for rnd in range(1, cfg.num_pretrain_rounds + 1):
        replies = stage_round(
            link,
            plan,
            stage,
            rnd,
            model,
            dataclasses.replace(budget, lr=local_lr(budget.lr, rnd, cfg.num_pretrain_rounds, cfg.local_lr_decay)),
            seed=seed,
            ramp=kl_ramp(rnd, cfg.num_pretrain_rounds) if stage == "vae" else (1.0, 1.0),
            encoder=encoder,
            latent_dim=latent_dim,
            options=SiteOptions.of(cfg),
            site_vectors=site_vectors,
            control=control,
        )
        if control is not None:
            control = update_control(control, replies)
        if isinstance(model, VAE) and model.site_embedding is not None:  # each site's own vector, before FedAvg
            site_vectors.update({r.site: np.array(cast(StateDict, r.payload.weights)[SITE_KEY]) for r in replies})
        losses.append(_combine(model, replies, opt, cfg, site_classes))
    return losses


def fedavg_pretrain(
    link: Link,
    plan: Plan,
    cfg: FederationConfig,
    vae: VAE,
    scdg: SCDG,
    *,
    site_classes: Mapping[str, Collection[int]] | None = None,
    site_vectors: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Train ``vae`` and ``scdg`` in place across the sites; return losses and seconds per stage.

    ``site_classes``: plan class ids held by each site (needed for class-aware aggregation). ``site_vectors``: filled
    with each site's VAE site vector when the VAE has one (``site-covariate``); the VAE itself keeps their average.
    """
    vectors = {} if site_vectors is None else site_vectors
    vae_budget, scdg_budget = budgets(cfg)
    history: dict[str, Any] = {
        "source": "fedavg",
        "vae_loss": [],
        "scdg_loss": [],
        "seconds": {},
        "schedule": {
            "rounds": cfg.num_pretrain_rounds,
            "vae_local_steps": vae_budget.steps,
            "scdg_local_steps": scdg_budget.steps,
            "vae_batch_size": vae_budget.batch_size,
            "scdg_batch_size": scdg_budget.batch_size,
            "server_optimizer": cfg.server_optimizer,
            "server_lr": optimizer_for(cfg, vae).lr,
            "class_aware_aggregation": cfg.class_aware_aggregation,
            "proximal_mu": cfg.proximal_mu,
            "site_optimizer_state": cfg.site_optimizer_state,
            "local_lr_decay": cfg.local_lr_decay,
            "balanced_class_heads": cfg.balanced_class_heads,
            "site_covariate": cfg.site_covariate,
            "drift_control": cfg.drift_control,
        },
    }
    latent_dim = vae.config.latent_dim
    stage = functools.partial(_stage_rounds, link, plan, cfg, site_classes, latent_dim=latent_dim, site_vectors=vectors)
    t0 = time.perf_counter()
    history["vae_loss"] = stage("vae", vae, vae_budget, seed=cfg.seed)
    t1 = time.perf_counter()
    replies = stage_round(
        link, plan, "latent-stats", 0, vae, vae_budget, seed=cfg.seed, latent_dim=latent_dim, site_vectors=vectors
    )
    stats = [r.payload for r in replies]
    mean, std = latent_moments(  # a decoded latent-stats reply carries both sums
        [cast(np.ndarray, r.latent_sum) for r in stats],
        [cast(np.ndarray, r.latent_sumsq) for r in stats],
        [r.num_examples for r in stats],
    )
    set_latent_stats(scdg, mean, std)
    t2 = time.perf_counter()
    history["scdg_loss"] = stage("scdg", scdg, scdg_budget, seed=cfg.seed + 500, encoder=vae)
    history["seconds"] = {"vae": t1 - t0, "latent_stats": t2 - t1, "scdg": time.perf_counter() - t2}
    logger.info(
        "federated pretraining: VAE %d x %d steps (%.1f s), SCDG %d x %d steps (%.1f s)",
        cfg.num_pretrain_rounds,
        vae_budget.steps,
        t1 - t0,
        cfg.num_pretrain_rounds,
        scdg_budget.steps,
        history["seconds"]["scdg"],
    )
    return history
