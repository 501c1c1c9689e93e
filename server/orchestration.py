"""The federated run as named phases around ``grid.send_and_receive``.

wait for sites -> profile -> plan -> pretrain (FedAvg or checkpoint) -> for r in 1..R: distill ->
validate -> decode and fuse -> fine-tune the SCDG -> train MLP + logistic regression -> evaluate at
the sites -> aggregate. After every completed phase the server state is checkpointed, so that
``resume=true`` continues from the last one.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid

from server import dp_pretrain, fedavg
from server.averaging import aggregate_scores, site_result
from server.config import FederationConfig
from server.errors import NO_PLAN, RESUME_MISMATCH, FederationStopped
from server.messaging import Link, wait_for_nodes
from server.privacy import privacy_plan
from server.reference import init_models, reference_genes
from server.run_store import RESUME_FREE, RUN_LOG, RunStore, run_log
from server.synthesis import (
    SiteCodes,
    finetune_generator,
    fresh_models,
    fuse_round,
    provenance,
    train_evaluators,
)
from server.validation import decode, validate_distill, validate_evaluate, validate_profile
from shared.checkpoint import load_model, model_json, state_of
from shared.distill import Codes, DistillConfig, resolve_iterations, resolve_t_star, wire_fields
from shared.errors import ConfigError
from shared.models import SCDG, VAE
from shared.plan import plan_center, plan_vocabulary
from shared.pretrain import latent_dim_for
from shared.protocol import (
    EVALUATORS,
    MSG_DISTILL,
    MSG_EVALUATE,
    MSG_PROFILE,
    DistillReply,
    DistillRequest,
    EvaluateReply,
    EvaluateRequest,
    Plan,
    ProfileReply,
    ProfileRequest,
    SiteSpec,
)

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """Mutable state of one run (what a checkpoint saves, plus the live link)."""

    cfg: FederationConfig
    link: Link
    store: RunStore
    plan: Plan | None = None
    vae: VAE | None = None
    scdg: SCDG | None = None
    site_classes: dict[str, set[int]] = field(default_factory=dict)
    count_input: bool = False  # every site's input holds raw counts: the VAE gets a count head (synthetic counts)
    warm_codes: dict[str, Codes] = field(
        default_factory=dict
    )  # each site's latest codes, sent back to it for the warm start
    # site-covariate: each site's own VAE site vector (the VAE keeps their average)
    site_vectors: dict[str, np.ndarray] = field(default_factory=dict)
    # DP statistics pretraining: each site's released class means as the server denoised them (server.dp_pretrain);
    # sent back to that site for its distillation. Not checkpointed: a resumed run asks the sites again (same release)
    dp_means: dict[str, np.ndarray] = field(default_factory=dict)
    completed: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(
        default_factory=lambda: {"rounds": [], "phase_seconds": {}, "upload_bytes": {}, "dropped": []}
    )

    def ready(self) -> tuple[Plan, VAE, SCDG]:
        """The plan and generator pair (set once pretraining is done)."""
        if self.plan is None or self.vae is None or self.scdg is None:
            msg = "the run has no plan or generator yet; phases ran out of order"
            raise RuntimeError(msg)
        return self.plan, self.vae, self.scdg

    def checkpoint(self, phase: str) -> None:
        """Mark ``phase`` completed and persist the state."""
        plan, vae, scdg = self.ready()
        self.completed.append(phase)
        self._sync_metrics()
        self.store.write_metrics(self.metrics)
        self.store.checkpoint(
            self.completed,
            plan=plan,
            metrics=self.metrics,
            config=_resume_config(self.cfg),
            vae=vae,
            scdg=scdg,
            codes=self.warm_codes,
            site_vectors=self.site_vectors,
        )

    def _sync_metrics(self) -> None:
        for site, per_type in self.link.upload.items():
            totals = self.metrics["upload_bytes"].setdefault(site, {})
            for kind, n in per_type.items():
                totals[kind] = totals.get(kind, 0) + n
        self.link.upload.clear()
        self.metrics["dropped"].extend(self.link.dropped)
        self.link.dropped.clear()


def _resume_config(cfg: FederationConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_run_config().items() if k not in RESUME_FREE}


def _timed(run: Run, phase: str, t0: float) -> None:
    run.metrics["phase_seconds"][phase] = round(time.perf_counter() - t0, 3)


def collect_profiles(link: Link, nodes: list[int], spec: SiteSpec) -> list[ProfileReply]:
    """query.profile to every node; names the nodes after their sites (duplicates rejected)."""

    def check(node: int, rd: RecordDict, wire: int) -> ProfileReply:
        reply = decode(rd, ProfileReply)
        validate_profile(reply, seen_sites=set(link.nodes.values()))
        link.nodes[node] = reply.site_name
        return reply

    replies = link.exchange(MSG_PROFILE, {n: ProfileRequest(spec).to_record() for n in nodes}, "profile", check)
    for gone in set(link.nodes) - {r.node_id for r in replies}:
        link.nodes.pop(gone)
    return [r.payload for r in replies]


def make_plan(profiles: list[ProfileReply], cfg: FederationConfig, spec: SiteSpec) -> Plan:
    """Gene vocabulary (top variable genes every site has) and label vocabulary (union), or a pretrained run's plan."""
    if cfg.pretrained_path:
        import json

        path = Path(cfg.pretrained_path).expanduser() / "plan.json"
        if not path.is_file():
            msg = f"pretrained-path needs plan.json, vae.pt and scdg.pt (a previous run's directory); {path} is missing"
            raise ConfigError(msg)
        plan = dataclasses.replace(Plan.from_json(json.loads(path.read_text(encoding="utf-8"))), spec=spec, center=())
    else:
        allowed = reference_genes(cfg.init_path) if cfg.init_path else None
        try:
            genes, classes = plan_vocabulary(profiles, n_genes=cfg.n_genes, allowed=allowed)
        except ValueError as exc:
            raise FederationStopped(NO_PLAN, str(exc)) from None
        plan = Plan(tuple(genes), tuple(classes), spec)
    if spec.dp.enabled and spec.dp.class_means:  # the center the sites clip around: from this run's profiles only
        plan = dataclasses.replace(plan, center=plan_center(profiles, plan.genes))
    return plan


def pretrain(run: Run) -> None:
    """FedAvg pretraining across the sites, or the checkpoints under pretrained-path."""
    if run.plan is None:
        msg = "pretraining needs the plan"
        raise RuntimeError(msg)
    cfg = run.cfg
    if cfg.pretrained_path:
        base = Path(cfg.pretrained_path).expanduser()
        run.vae, run.scdg = load_model(base / "vae.pt", "vae"), load_model(base / "scdg.pt", "scdg")  # type: ignore[assignment]
        run.metrics["pretrain"] = {"source": "checkpoint", "path": str(base)}
        return
    if cfg.statistics_pretraining:
        latent_dim = cfg.latent_dim or latent_dim_for(len(run.plan.genes))
        run.vae, run.scdg, run.metrics["pretrain"], run.dp_means = dp_pretrain.statistics_pretrain(
            run.link, run.plan, cfg, latent_dim, _means_noise(run)
        )
        return
    init: dict[str, Any] | None = None
    if cfg.init_path:
        run.vae, run.scdg, init = init_models(
            cfg.init_path, run.plan.genes, len(run.plan.classes), seed=cfg.seed, count_head=run.count_input
        )
        latent_dim = run.vae.config.latent_dim
    else:
        latent_dim = cfg.latent_dim or latent_dim_for(len(run.plan.genes))
        run.vae, run.scdg = fresh_models(
            run.plan, latent_dim=latent_dim, seed=cfg.seed, count_head=run.count_input, site_dim=cfg.site_dim
        )
    run.metrics["pretrain"] = fedavg.fedavg_pretrain(
        run.link,
        run.plan,
        dataclasses.replace(cfg, latent_dim=latent_dim),
        run.vae,
        run.scdg,
        site_classes=run.site_classes,
        site_vectors=run.site_vectors,
    )
    if init is not None:
        run.metrics["pretrain"]["init"] = init


def _means_noise(run: Run) -> dict[str, float]:
    """Per site, the noise multiplier of its released class means (the run's privacy plan)."""
    return {site: float(p["noise_multiplier_class_means"]) for site, p in run.metrics["privacy_plan"].items()}


def _site_means(run: Run) -> dict[str, np.ndarray]:
    """Under DP statistics pretraining, every site's denoised class means (asked again after a resume)."""
    if not run.cfg.statistics_pretraining:
        return {}
    if not run.dp_means:
        plan, vae, _ = run.ready()
        run.dp_means = dp_pretrain.released_means(run.link, plan, run.cfg, vae.config.latent_dim, _means_noise(run))[0]
    return run.dp_means


def _sends_means(cfg: FederationConfig) -> bool:
    """Whether the sites send their class means with their codes (recenter, without DP; under DP the means come from
    the DP release only)."""
    return cfg.recenter and cfg.dp_epsilon <= 0


def _recentre_on(run: Run, parts: list[SiteCodes]) -> dict[str, np.ndarray] | None:
    """Per site, the class means its decoded cells are moved onto (``server.synthesis.recenter``; a zero row leaves
    a class alone), or None: the denoised DP release (dp-recenter) or the means the sites sent (recenter)."""
    if run.cfg.statistics_pretraining:
        return _site_means(run) if run.cfg.dp_recenter else None
    if not _sends_means(run.cfg):
        return None
    return {p.site: np.nan_to_num(p.class_means, nan=0.0) for p in parts if p.class_means is not None}


def distill_config(cfg: FederationConfig) -> DistillConfig:
    """DistillConfig from the run config over the library's defaults (seed set per site later)."""
    over: dict[str, Any] = {
        "iterations": cfg.distill_iterations,
        "t_star": cfg.distill_t_star,
        "init": cfg.distill_init,
        "guidance": cfg.distill_guidance,
    }
    return DistillConfig(k=cfg.cells_per_class, **{key: v for key, v in over.items() if v is not None})


def _resolved(dcfg: DistillConfig, scdg: SCDG) -> dict[str, Any]:
    """The distillation settings as the sites use them (what the library chose by k included), for provenance."""
    return {
        **wire_fields(dcfg),
        "iterations": resolve_iterations(dcfg),
        "t_star": resolve_t_star(dcfg, scdg.config.timesteps),
    }


def distill(run: Run, rnd: int) -> list[SiteCodes]:
    """train.distill at every site; validated codes per site."""
    plan, vae, scdg = run.ready()
    dcfg = distill_config(run.cfg)
    fields = {k: v for k, v in wire_fields(dcfg).items() if k != "seed"}
    vae_state, scdg_state, vae_json, scdg_json = state_of(vae), state_of(scdg), model_json(vae), model_json(scdg)
    warm = run.warm_codes if run.cfg.distill_warm_start else {}
    means = _site_means(run)
    requests = {}
    for node in sorted(run.link.nodes):
        last = warm.get(run.link.name(node))  # this site's own codes of its last round, never another site's
        requests[node] = DistillRequest(
            rnd,
            fedavg.with_site_vector(vae_state, run.site_vectors, run.link.name(node)),
            vae_json,
            scdg_state,
            scdg_json,
            plan,
            fields,
            fedavg.site_seed(run.cfg.seed + 7, run.link, node, 100 * rnd),
            run.cfg.distill_warm_start,
            warm_codes=last.codes if last is not None else None,
            warm_labels=last.labels.astype(np.int32) if last is not None else None,
            class_means=means.get(run.link.name(node)),
            send_class_means=_sends_means(run.cfg),
        )

    def check(node: int, rd: RecordDict, wire: int) -> DistillReply:
        reply = decode(rd, DistillReply)
        validate_distill(
            reply,
            requests[node],
            latent_dim=vae.config.latent_dim,
            site_classes=run.site_classes.get(run.link.name(node), set()),
            wire=wire,
        )
        return reply

    replies = run.link.exchange(MSG_DISTILL, {n: r.to_record() for n, r in requests.items()}, f"distill-{rnd}", check)
    for r in replies:
        if r.payload.privacy is not None:
            run.metrics.setdefault("privacy", {})[r.site] = dict(r.payload.privacy)
            logger.info(
                "site %s: epsilon %.3g at delta %.2g spent over the run (its accountant)",
                r.site,
                r.payload.privacy["epsilon"],
                r.payload.privacy["delta"],
            )
    t_star = resolve_t_star(dcfg, scdg.config.timesteps)
    parts = [
        SiteCodes(
            r.site,
            Codes(r.payload.codes, r.payload.labels.astype(np.int64), t_star, dcfg.guidance),
            r.payload.distill_seconds,
            r.wire,
            r.payload.library,
            run.site_vectors.get(r.site) if run.cfg.site_covariate == "own" else None,
            r.payload.class_means,
        )
        for r in replies
    ]
    run.warm_codes.update({p.site: p.codes for p in parts})  # a site that dropped out keeps its older codes
    return parts


def evaluate(run: Run, rnd: int, X: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Train the evaluation models on the fused cells, have every site score them, aggregate."""
    plan = run.ready()[0]
    n_classes = len(plan.classes)
    # The same evaluator seed every round: rounds then differ only in their synthetic cells, not in the MLP's
    # initialisation.
    models = train_evaluators(X, y, n_classes, mlp=run.cfg.mlp, seed=run.cfg.seed)
    req = EvaluateRequest(
        rnd,
        X,
        y.astype(np.int32),
        state_of(models.mlp),
        model_json(models.mlp),
        models.coef,
        models.intercept,
        models.classes,
        plan,
        run.cfg.seed,
        run.cfg.mlp.epochs,
        run.cfg.mlp.min_steps,
        run.cfg.mlp.max_steps,
    )

    def check(node: int, rd: RecordDict, wire: int) -> EvaluateReply:
        reply = decode(rd, EvaluateReply)
        validate_evaluate(reply, round_=rnd, n_classes=n_classes)
        return reply

    replies = run.link.exchange(
        MSG_EVALUATE, {n: req.to_record() for n in sorted(run.link.nodes)}, f"evaluate-{rnd}", check
    )
    per_site = {r.site: site_result(r.payload) for r in replies}
    for site, res in per_site.items():
        fed_acc, local_acc, tuned_acc = (
            res["scores"]["mlp"]["accuracy"],
            res["local_only"].get("mlp", {}).get("accuracy", float("nan")),
            res["fine_tuned"].get("mlp", {}).get("accuracy", float("nan")),
        )
        logger.info(
            "round %d, site %s: MLP accuracy %.3f federated, %.3f fine-tuned at the site vs %.3f local-only "
            "(gain %+.3f, fine-tuned %+.3f)",
            rnd,
            site,
            fed_acc,
            tuned_acc,
            local_acc,
            fed_acc - local_acc,
            tuned_acc - local_acc,
        )
    run.store.save_models(mlp=models.mlp)
    return {"sites": per_site, "aggregate": aggregate_scores(per_site, EVALUATORS)}


def run_round(run: Run, rnd: int) -> None:
    """One distillation round: distill, fuse, fine-tune, evaluate, store."""
    plan, vae, scdg = run.ready()
    t0 = time.perf_counter()
    parts = distill(run, rnd)
    mode = run.cfg.resolved_decode_mode
    prov = provenance(
        vae,
        scdg,
        round_=rnd,
        sites=[p.site for p in parts],
        distill=_resolved(distill_config(run.cfg), scdg),
        decode=mode,
    )
    fused = fuse_round(
        parts,
        vae,
        scdg,
        plan,
        round_=rnd,
        provenance=prov,
        mode=mode,
        seed=run.cfg.seed + 10 * rnd,
        samples_per_code=run.cfg.samples_per_code,
        class_means=_recentre_on(run, parts),
        recenter_how="shift" if run.cfg.statistics_pretraining else "scale",
    )
    t1 = time.perf_counter()
    losses = finetune_generator(
        scdg,
        parts,
        steps=run.cfg.finetune_steps,
        lr=run.cfg.finetune_lr,
        anchor_weight=run.cfg.finetune_anchor_weight,
        seed=run.cfg.seed + rnd,
    )
    t2 = time.perf_counter()
    X = np.asarray(fused.X.toarray(), dtype=np.float32)
    y = np.asarray(fused.obs[plan.spec.label_key].cat.codes, dtype=np.int64)
    result = evaluate(run, rnd, X, y)
    final = rnd == run.cfg.num_distill_rounds
    run.store.write_synthetic(fused, round_=rnd, final=final)
    agg = result["aggregate"]["cell_weighted"]["mlp"]
    result |= {
        "round": rnd,
        "n_synthetic": int(fused.n_obs),
        "sites_distilled": [p.site for p in parts],
        "finetune_loss": losses[-1] if losses else None,
        "distill_seconds": {p.site: p.distill_seconds for p in parts},
        "distill_upload_bytes": {p.site: p.upload_bytes for p in parts},
        "seconds": {"distill_fuse": t1 - t0, "finetune": t2 - t1, "evaluate": time.perf_counter() - t2},
    }
    run.metrics["rounds"].append(result)
    logger.info(
        "round %d: %d synthetic cells from %d sites; MLP accuracy %.3f (cell-weighted), macro-F1 %.3f",
        rnd,
        fused.n_obs,
        len(parts),
        agg["accuracy"],
        agg["macro_f1"],
    )
    _timed(run, f"round-{rnd}", t0)
    run.store.save_models(vae=vae, scdg=scdg)
    run.checkpoint(f"round-{rnd}")


def _start(run: Run, grid: Grid, run_id: str) -> list[int]:
    """Fresh start or resume; returns the connected node ids."""
    cfg = run.cfg
    state = run.store.load_checkpoint() if cfg.resume else None
    if cfg.resume and state is None:
        logger.info("resume=true but no checkpoint in %s: starting afresh", run.store.dir)
    if state is None:
        run.store.clear()
    else:
        if state.config != _resume_config(cfg):
            changed = sorted(
                k
                for k in set(state.config) | set(_resume_config(cfg))
                if state.config.get(k) != _resume_config(cfg).get(k)
            )
            raise FederationStopped(RESUME_MISMATCH, f"config keys changed since the checkpoint: {changed}")
        run.completed, run.plan, run.metrics, run.vae, run.scdg = (
            list(state.completed),
            state.plan,
            state.metrics,
            state.vae,
            state.scdg,
        )
        run.warm_codes, run.site_vectors = dict(state.codes), dict(state.site_vectors)
        logger.info("resuming run %s after phase %s", run_id, state.completed[-1])
    run.store.write_config(cfg.to_run_config(), run_id=run_id)
    return wait_for_nodes(grid, min_sites=cfg.min_sites, expected=cfg.expected_sites, deadline_s=cfg.site_wait_s)


def run(grid: Grid, cfg: FederationConfig, *, run_id: str) -> Path:
    """The whole federated run; returns the run directory (its run.log holds this run's progress lines)."""
    store = RunStore(cfg.run_dir(run_id))
    with run_log(store.dir / RUN_LOG, fresh=not cfg.resume):
        logger.info("run %s: outputs go to %s", run_id, store.dir)
        link = Link(grid, cfg.round_timeout_s, cfg.min_sites)
        r = Run(cfg, link, store)
        nodes = _start(r, grid, run_id)
        try:
            _phases(r, nodes)
        except FederationStopped as exc:
            r.metrics["stopped"] = {"reason": exc.reason, "detail": exc.detail}
            r._sync_metrics()
            store.write_metrics(r.metrics)
            logger.error("%s", exc)
            raise
        logger.info("run %s complete: %s", run_id, store.dir)
    return store.dir


def _phases(r: Run, nodes: list[int]) -> None:
    """Every phase in order, skipping those a resumed checkpoint completed."""
    cfg, link, store = r.cfg, r.link, r.store
    t0 = time.perf_counter()
    # DP noise and the sites' release ledgers are keyed by the run: a fresh start gets a fresh key, a resume keeps
    # its own
    spec = cfg.site_spec(r.metrics.setdefault("run_key", f"{store.dir.name}-{secrets.token_hex(6)}"))
    profiles = collect_profiles(link, nodes, spec)
    if r.plan is None:
        r.plan = make_plan(profiles, cfg, spec)
        store.write_plan(r.plan)
    if spec.dp.enabled:
        r.metrics["privacy_plan"] = privacy_plan(profiles, r.plan)
    lookup = {c: i for i, c in enumerate(r.plan.classes)}
    r.site_classes = {p.site_name: {lookup[c] for c in p.label_names if c in lookup} for p in profiles}
    r.metrics["sites"] = sorted(r.site_classes)
    r.count_input = all(p.has_counts for p in profiles)
    r.metrics["count_input"] = r.count_input
    logger.info(
        "plan: %d genes, %d classes, %d sites (%s)",
        len(r.plan.genes),
        len(r.plan.classes),
        len(profiles),
        ", ".join(r.metrics["sites"]),
    )
    _timed(r, "profile-plan", t0)
    if "pretrain" not in r.completed:
        t0 = time.perf_counter()
        pretrain(r)
        plan, vae, scdg = r.ready()
        store.save_pretrained(plan, vae, scdg)
        _timed(r, "pretrain", t0)
        r.checkpoint("pretrain")
    for rnd in range(1, cfg.num_distill_rounds + 1):
        if f"round-{rnd}" not in r.completed:
            run_round(r, rnd)
    if cfg.report:
        from server.report import write_report

        write_report(store.dir)
