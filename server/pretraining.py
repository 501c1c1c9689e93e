"""Federated pretraining of the latent VAE and the SCDG: FedAvg rounds of local steps, one latent-moments round.

Schedule: ``num-pretrain-rounds`` rounds of ``vae-local-steps`` VAE steps at every site, a
latent-stats round (pooled per-dimension mean/std of the encoder's latents, for the SCDG's
standardisation), then ``num-pretrain-rounds`` rounds of ``scdg-local-steps`` SCDG steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from flwr.app import RecordDict

from server.config import FederationConfig
from server.fusion import fedavg, latent_moments
from server.messaging import Link
from server.training import load_state, model_json, state_of
from server.validation import decode, validate_pretrain
from shared.models import SCDG, VAE
from shared.pretrain import PretrainConfig
from shared.protocol import MSG_PRETRAIN, Plan, PretrainReply, PretrainRequest, Stage
from shared.training import set_latent_stats

logger = logging.getLogger(__name__)

VAE_WARMUP = 0.3  # KL warm-up share of the first VAE round's local steps; later rounds start at full weight


@dataclass(frozen=True)
class StageBudget:
    """Local optimisation budget of one stage."""

    steps: int
    lr: float
    batch_size: int


def budgets(cfg: FederationConfig) -> tuple[StageBudget, StageBudget]:
    """VAE and SCDG budgets: steps from the run config, lr/batch from it or from PretrainConfig's defaults."""
    pre = PretrainConfig()
    vae = StageBudget(cfg.vae_local_steps, cfg.pretrain_lr if cfg.pretrain_lr > 0 else pre.vae.lr,
                      cfg.vae_batch_size if cfg.vae_batch_size > 0 else pre.vae.batch_size)
    scdg = StageBudget(cfg.scdg_local_steps, cfg.pretrain_lr if cfg.pretrain_lr > 0 else pre.scdg.lr,
                       cfg.scdg_batch_size if cfg.scdg_batch_size > 0 else pre.scdg.batch_size)
    return vae, scdg


def site_seed(base: int, link: Link, node: int, salt: int) -> int:
    """Deterministic per-site seed: base + 1000 * (index of the site name) + salt."""
    names = sorted(set(link.nodes.values()))
    return base + 1000 * names.index(link.name(node)) + salt


def _round(link: Link, plan: Plan, stage: Stage, rnd: int, model: Any, budget: StageBudget, *, seed: int,
           warmup: float = 0.0, encoder: VAE | None = None, latent_dim: int) -> list[PretrainReply]:
    """Send one stage round to every site; return the validated replies (sorted by site)."""
    sent = state_of(model)
    requests = {node: PretrainRequest(stage, rnd, sent, model_json(model), plan, budget.steps, budget.lr, budget.batch_size, warmup,
                                      site_seed(seed, link, node, rnd), encoder=state_of(encoder) if encoder is not None else None,
                                      encoder_config=model_json(encoder) if encoder is not None else "")
                for node in sorted(link.nodes)}

    def check(node: int, content: RecordDict, wire: int) -> PretrainReply:
        reply = decode(content, PretrainReply)
        validate_pretrain(reply, requests[node], latent_dim=latent_dim)
        return reply

    contents = {node: req.to_record() for node, req in requests.items()}
    return [r.payload for r in link.exchange(MSG_PRETRAIN, contents, f"pretrain-{stage}-{rnd}", check)]


def fedavg_pretrain(link: Link, plan: Plan, cfg: FederationConfig, vae: VAE, scdg: SCDG) -> dict[str, Any]:
    """Train ``vae`` and ``scdg`` in place across the sites; return losses and seconds per stage."""
    vae_budget, scdg_budget = budgets(cfg)
    history: dict[str, Any] = {"source": "fedavg", "vae_loss": [], "scdg_loss": [], "seconds": {},
                               "schedule": {"rounds": cfg.num_pretrain_rounds, "vae_local_steps": vae_budget.steps, "scdg_local_steps": scdg_budget.steps,
                                            "vae_batch_size": vae_budget.batch_size, "scdg_batch_size": scdg_budget.batch_size}}
    t0 = time.perf_counter()
    for rnd in range(1, cfg.num_pretrain_rounds + 1):
        replies = _round(link, plan, "vae", rnd, vae, vae_budget, seed=cfg.seed, warmup=VAE_WARMUP if rnd == 1 else 0.0, latent_dim=cfg.latent_dim)
        load_state(vae, fedavg([r.weights for r in replies], [r.num_examples for r in replies]))  # type: ignore[misc]
        history["vae_loss"].append(sum(r.loss * r.num_examples for r in replies) / sum(r.num_examples for r in replies))
    t1 = time.perf_counter()
    replies = _round(link, plan, "latent-stats", 0, vae, vae_budget, seed=cfg.seed, latent_dim=cfg.latent_dim)
    mean, std = latent_moments([r.latent_sum for r in replies], [r.latent_sumsq for r in replies], [r.num_examples for r in replies])  # type: ignore[misc]
    set_latent_stats(scdg, mean, std)
    t2 = time.perf_counter()
    for rnd in range(1, cfg.num_pretrain_rounds + 1):
        replies = _round(link, plan, "scdg", rnd, scdg, scdg_budget, seed=cfg.seed + 500, encoder=vae, latent_dim=cfg.latent_dim)
        load_state(scdg, fedavg([r.weights for r in replies], [r.num_examples for r in replies]))  # type: ignore[misc]
        history["scdg_loss"].append(sum(r.loss * r.num_examples for r in replies) / sum(r.num_examples for r in replies))
    history["seconds"] = {"vae": t1 - t0, "latent_stats": t2 - t1, "scdg": time.perf_counter() - t2}
    logger.info("federated pretraining: VAE %d x %d steps (%.1f s), SCDG %d x %d steps (%.1f s)", cfg.num_pretrain_rounds, vae_budget.steps,
                t1 - t0, cfg.num_pretrain_rounds, scdg_budget.steps, history["seconds"]["scdg"])
    return history
