"""What a site computes for each message: plain functions from a decoded request and the site's data to a reply.

Replies carry aggregates, model weights, codes and scores only: never an expression row, a cell
id or a per-cell value.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any, Literal, overload

import numpy as np
import torch

from client import privacy
from client.privacy import SiteDP
from client.site import SiteData, SiteProfile, profile_of_site
from shared.audit import audit
from shared.checkpoint import build_model, load_state, state_of
from shared.counts import MIN_CELLS, library_stats
from shared.distill import (
    ClassCounts,
    Codes,
    DistillConfig,
    class_gene_means,
    distill_codes,
    resolve_gene_mean_weight,
    resolve_t_star,
    warm_start_fits,
)
from shared.drift import GradientShift, zero_controls
from shared.errors import CheckpointError, ConfigError, ProtocolError
from shared.evaluation import PREDICT_ROWS, Matrix, MLPTrainConfig, fidelity, fit_predict, predict_mlp, score, train_mlp
from shared.fitting import (
    AdamCarry,
    TrainConfig,
    anchor_of,
    class_frequencies,
    dense_rows,
    encode,
    fit_scdg,
    fit_vae,
    row_view,
)
from shared.models import SCDG, VAE, MLPClassifier
from shared.privacy.ledger import digest
from shared.privacy.mechanisms import torch_generator
from shared.protocol import EVALUATORS, Plan, PretrainReply, PretrainRequest, ProfileReply, StateDict
from shared.protocol.rounds import (
    LIBRARY_STATS,
    LOCAL_EVALUATORS,
    DistillReply,
    DistillRequest,
    EvaluateReply,
    EvaluateRequest,
    EvaluatorScores,
)

logger = logging.getLogger(__name__)
CPU = torch.device("cpu")


def profile_site(site: SiteData | SiteProfile, dp: SiteDP | None = None) -> ProfileReply:
    """Per-gene sums / sums of squares / detection counts and cells per label, over training cells (noised under DP).

    ``site``: streamed statistics (``client.site.load_profile``), or a prepared site holding all its genes.
    """
    from shared.plan import profile_from_stats  # imports anndata/pandas: only this message needs them

    if isinstance(site, SiteData):
        site = profile_of_site(site, clip=dp is not None)
    if dp is not None:
        return privacy.profile(site, dp)
    labels = [site.classes[j] for j in site.labels[site.train_idx]]
    return profile_from_stats(
        site.name,
        site.genes,
        (site.sums, site.sumsq, site.detected),
        labels,
        n_cells=len(labels),
        has_counts=site.has_counts,
    )


@overload
def _model(kind: Literal["vae"], config_json: str, weights: StateDict) -> VAE: ...
@overload
def _model(kind: Literal["scdg"], config_json: str, weights: StateDict) -> SCDG: ...
@overload
def _model(kind: Literal["mlp"], config_json: str, weights: StateDict) -> MLPClassifier: ...
def _model(kind: str, config_json: str, weights: StateDict) -> torch.nn.Module:
    """A model of ``kind`` from a JSON config and a state dict; protocol errors for anything that does not fit."""
    try:
        model = build_model(kind, json.loads(config_json))
        load_state(model, weights)
    except (CheckpointError, json.JSONDecodeError, TypeError, ValueError, RuntimeError) as exc:
        msg = (
            f"cannot build the {kind} model from the message ({type(exc).__name__}); "
            "server and site run different fedscdd versions?"
        )
        raise ProtocolError(msg) from None
    model.eval()
    return model


def _train_rows(site: SiteData, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """Site-local rows of the training cells whose class is in the plan, and their plan class ids."""
    y, ok = site.global_labels(plan.classes)
    idx = site.train_idx[ok[site.train_idx]]
    if idx.size == 0:
        msg = "no training cells of the plan's classes at this site"
        raise ProtocolError(msg)
    return idx, y[idx]


def _train_cells(site: SiteData, plan: Plan):  # noqa: ANN202 - (csr, labels)
    """Training cells whose class is in the plan, with plan class ids."""
    idx, y = _train_rows(site, plan)
    return row_view(site.X, idx), y


def _on(device: torch.device, dp: SiteDP | None) -> torch.device:
    """The device this message's models use; DP-SGD stays on CPU (its noise comes from the site's CPU generator)."""
    if dp is not None and device.type != "cpu":
        msg = f"device={device.type!r} with dp-epsilon: DP runs on CPU in this release; set device='cpu' for DP runs"
        raise ConfigError(msg)
    return device


def pretrain_site(
    site: SiteData,
    req: PretrainRequest,
    dp: SiteDP | None = None,
    device: torch.device = CPU,
    adam: AdamCarry | None = None,
    control: Mapping[str, np.ndarray] | None = None,
) -> PretrainReply:
    """Local steps of the requested stage (or latent moments for 'latent-stats'); DP-SGD and noised moments under DP.

    Under DP the reply's cell count is the noised count of the profile and its loss 0 (a loss over
    real cells would be one more release). ``device``: where the models run (``shared.device``). ``adam``: the
    AdamW moments to continue from, updated in place (``client.optimizer_state`` keeps them between rounds).
    ``control``: the site's SCAFFOLD control variate when the request carries the server's (``shared.drift``; zeros
    when None); the reply then carries the variate's change (the site keeps old + change, ``client.control_state``).
    """
    dev = _on(device, dp)
    X, y = _train_cells(site, req.plan)
    cfg = TrainConfig(steps=req.steps, lr=req.lr, batch_size=req.batch_size, seed=req.seed)
    b = privacy.budget(site, req.plan, dp) if dp is not None else None
    n_cells = round(b.n_cells) if b is not None else int(X.shape[0])
    if dp is not None:
        privacy.check_pretrain(
            dp,
            req.stage,
            req.round,
            req.steps,
            req.batch_size,
            digest({**req.weights, **{f"encoder/{k}": v for k, v in (req.encoder or {}).items()}}),
        )
    if req.stage == "class-means":
        if b is None or dp is None:
            msg = "refused: per-class gene means are released only under DP (dp-epsilon > 0)"
            raise ProtocolError(msg)
        counts = privacy.plan_counts(site, req.plan, dp)
        # raw: the coordinator denoises every site's release together (shared.privacy.denoise.joint_denoise)
        means = privacy.class_means_release(X, y, counts, req.plan, dp, b, raw=True)
        return PretrainReply("class-means", req.round, n_cells, 0.0, class_means=means, class_counts=counts)
    if req.stage == "latent-stats":
        Z = encode(_model("vae", req.model_config, req.weights).to(dev), X).astype(np.float64)
        if b is not None and dp is not None:
            s, q = privacy.latent_moments(Z, dp, b.sigma("latent moments"))
            return PretrainReply("latent-stats", req.round, n_cells, 0.0, latent_sum=s, latent_sumsq=q)
        return PretrainReply("latent-stats", req.round, n_cells, 0.0, latent_sum=Z.sum(0), latent_sumsq=(Z**2).sum(0))
    prior = class_frequencies(y, len(req.plan.classes)) if req.balanced_heads and dp is None else None
    prox = req.proximal_mu / 2  # FedProx: mu/2 * ||w - w_global||^2 around the weights this round started from
    private = (
        {}
        if b is None or dp is None
        else {
            "dp": privacy.dp_sgd(b, req.batch_size, dp.spec.max_grad_norm),
            "dp_generator": torch_generator(dp.secret, [dp.spec.run_key, dp.site_key, req.stage, req.round]),
        }
    )
    if req.control is not None and dp is not None:
        msg = "refused: SCAFFOLD control variates are not released under DP in this release; set drift-control=none"
        raise ProtocolError(msg)
    model: VAE | SCDG
    if req.stage == "vae":
        model = _model("vae", req.model_config, req.weights).to(dev)
        shift = _shift(model, req, control)
        library = site.library[_train_rows(site, req.plan)[0]] if site.has_counts else None
        losses = fit_vae(
            model,
            X,
            y,
            cfg,
            anchor=anchor_of(model) if prox > 0 else None,
            anchor_weight=prox,
            kl_ramp=req.kl_ramp,
            library=library,
            adam=adam,
            class_prior=prior,
            shift=shift,
            **private,
        )
    else:
        vae = _model("vae", req.encoder_config, req.encoder or {}).to(dev)
        model = _model("scdg", req.model_config, req.weights).to(dev)
        shift = _shift(model, req, control)
        losses = fit_scdg(
            model,
            encode(vae, X),
            y,
            cfg,
            anchor=anchor_of(model) if prox > 0 else None,
            anchor_weight=prox,
            adam=adam,
            class_prior=prior,
            shift=shift,
            **private,
        )
    loss = float(losses[-1]) if losses and b is None else 0.0
    delta = shift.change() if shift is not None else None
    return PretrainReply(req.stage, req.round, n_cells, loss, weights=state_of(model), control_delta=delta)


def _shift(model: VAE | SCDG, req: PretrainRequest, control: Mapping[str, np.ndarray] | None) -> GradientShift | None:
    """SCAFFOLD's gradient correction for this round when the server sent its control variate."""
    if req.control is None:
        return None
    try:
        return GradientShift(model, req.control, control if control is not None else zero_controls(model))
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


def _distill_config(req: DistillRequest) -> DistillConfig:
    known = {f.name for f in fields(DistillConfig)}
    unknown = sorted(set(req.distill) - known)
    if unknown:
        msg = f"unknown distillation settings {unknown}; server and site run different fedscdd versions"
        raise ProtocolError(msg)
    settings: dict[str, Any] = {**req.distill, "seed": req.seed}  # scalars; DistillConfig checks their values
    return DistillConfig(**settings)


def _warm_codes(
    req: DistillRequest, labels: np.ndarray, latent_dim: int, t_star: int, guidance: float, counts: ClassCounts | None
) -> Codes | None:
    """The previous round's codes the server sent back, when they fit this round (same classes, k and latent size)."""
    if not req.warm_start or req.warm_codes is None or req.warm_labels is None:
        return None
    codes = Codes(req.warm_codes, req.warm_labels.astype(np.int64), t_star, guidance)
    if not warm_start_fits(codes, labels, req.k, latent_dim, counts):
        logger.warning(
            "warm-start codes do not fit this round (classes, k or latent size changed): starting from fresh codes"
        )
        return None
    return codes


def _private_config(cfg: DistillConfig, dp: SiteDP) -> DistillConfig:
    """The distillation settings under DP: codes start from noise; objectives that read real cells directly are
    refused."""
    direct = [name for name in ("latent_weight", "mmd_weight", "gene_weight", "gm_weight") if getattr(cfg, name) > 0]
    if direct:
        msg = (
            f"refused under DP: the distillation terms {direct} read real cells directly; set them to 0 or turn DP off"
        )
        raise ProtocolError(msg)
    weight = resolve_gene_mean_weight(cfg, private=True)
    if weight > 0 and not dp.spec.class_means:
        msg = (
            "refused under DP: the objective matches class gene means, which the run's DP plan did not budget "
            "(dp-class-means)"
        )
        raise ProtocolError(msg)
    return replace(cfg, init="noise", gene_mean_weight=weight)


def distill_site(
    site: SiteData, req: DistillRequest, dp: SiteDP | None = None, device: torch.device = CPU
) -> tuple[DistillReply, np.ndarray | None]:
    """Distill k codes per local class through the frozen generator; warm start from the codes the server sent back.

    Also returns the site-local rows of the cells whose latents seeded the codes (None on a warm
    start: the seeds are still those of the round the codes started from). They stay at the site,
    for the seed-targeted privacy audit.
    """
    idx, y = _train_rows(site, req.plan)
    X = row_view(site.X, idx)  # a view: the training cells are one block of the prepared matrix
    cfg = _distill_config(req)
    dev = _on(device, dp)
    vae = _model("vae", req.vae_config, req.vae).to(dev)
    scdg = _model("scdg", req.scdg_config, req.scdg).to(dev)
    n_classes = len(req.plan.classes)
    given, means, report, b = None, None, None, None
    if dp is not None:
        cfg, b = _private_config(cfg, dp), privacy.budget(site, req.plan, dp)
        counts = privacy.plan_counts(site, req.plan, dp)
        classes = np.flatnonzero(counts > 0)
        given = (classes, np.minimum(counts[classes], cfg.k))
        if resolve_gene_mean_weight(cfg) > 0:
            # the coordinator's denoising of every site's release when it sent it (post-processing), else this site's
            means = (
                req.class_means
                if req.class_means is not None
                else privacy.class_means_release(X, y, counts, req.plan, dp, b)
            )
        report = privacy.report(b, dp)
    else:
        counts = np.bincount(y, minlength=n_classes).astype(np.int64)
    if req.send_class_means and dp is not None:
        msg = "refused under DP: class means leave a site only through its DP plan's release, not with the codes"
        raise ProtocolError(msg)
    init = _warm_codes(req, y, vae.config.latent_dim, resolve_t_star(cfg, scdg.config.timesteps), cfg.guidance, given)
    t0 = time.perf_counter()
    codes = distill_codes(vae, scdg, X, y, cfg, init_codes=init, counts=given, gene_means=means)
    seconds = time.perf_counter() - t0
    if not site.has_counts or (dp is not None and not dp.spec.library_stats):
        library = np.full((n_classes, LIBRARY_STATS), np.nan, np.float32)  # none, or none the run may release
    elif dp is not None and b is not None:
        library = privacy.library_stats(X, site.library[idx], y, counts, dp, b.sigma("library statistics"))
    else:
        library = library_stats(X, site.library[idx], y, n_classes)
    logger.info(
        "distilled %d codes for %d classes in %.1f s (warm start: %s)",
        len(codes.labels),
        len(np.unique(codes.labels)),
        seconds,
        init is not None,
    )
    reply = DistillReply(
        req.round,
        codes.codes.astype(np.float32),
        codes.labels.astype(np.int32),
        counts,
        seconds,
        library,
        privacy=report,
        class_means=class_gene_means(X, y, n_classes, MIN_CELLS) if req.send_class_means else None,
    )
    seeds = None if init is not None or codes.seed_rows is None else idx[codes.seed_rows]
    return reply, seeds


def _predict_logreg(X: Matrix, coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Predictions of a fitted multinomial/binary logistic regression from its coefficients (a block of cells densified
    at a time)."""
    parts = [
        dense_rows(X, np.arange(i, min(i + PREDICT_ROWS, X.shape[0]))).numpy() @ coef.T
        for i in range(0, X.shape[0], PREDICT_ROWS)
    ]
    scores = np.concatenate(parts) + intercept if parts else np.zeros((0, coef.shape[0]))
    if coef.shape[0] == 1 and classes.size == 2:
        return classes[(scores[:, 0] > 0).astype(int)]
    if coef.shape[0] != classes.size:
        msg = f"logistic regression has {coef.shape[0]} rows for {classes.size} classes"
        raise ProtocolError(msg)
    return classes[np.argmax(scores, axis=1)]


def _scores(X: Matrix, y: np.ndarray, req: EvaluateRequest, n_classes: int) -> dict[str, EvaluatorScores]:
    """Every evaluator's scores on (X, y); NaN everywhere when there are no cells."""
    if X.shape[0] == 0:
        return {ev: EvaluatorScores(float("nan"), float("nan"), (float("nan"),) * n_classes) for ev in EVALUATORS}
    preds = {
        "mlp": predict_mlp(_model("mlp", req.mlp_config, req.mlp), X),
        "logreg": _predict_logreg(X, req.logreg_coef, req.logreg_intercept, req.logreg_classes),
        "knn": fit_predict("knn", req.X, req.labels.astype(np.int64), X, n_classes, seed=req.seed),
    }
    out = {}
    for ev in EVALUATORS:
        s = score(y, np.asarray(preds[ev]))
        out[ev] = EvaluatorScores(
            s.accuracy, s.macro_f1, tuple(s.per_class_recall.get(c, float("nan")) for c in range(n_classes))
        )
    return out


def local_only_key(req: EvaluateRequest) -> str:
    """What the local-only scores depend on: the plan, the seed and the MLP rule (not the round, not the synthetic
    cells)."""
    return json.dumps([req.plan.digest(), req.seed, repr(mlp_rule(req))])


def mlp_rule(req: EvaluateRequest) -> MLPTrainConfig:
    """The training rule of the server's MLP, which the site's local-only and fine-tuned MLPs follow too."""
    return MLPTrainConfig(epochs=req.mlp_epochs, min_steps=req.mlp_min_steps, max_steps=req.mlp_max_steps)


def evaluate_site(
    site: SiteData,
    req: EvaluateRequest,
    members: np.ndarray | None = None,
    local: dict[str, dict[str, float]] | None = None,
    device: torch.device = CPU,
) -> EvaluateReply:
    """Score the server's models on held-out test and validation cells; fidelity, the privacy audit and local-only
    scores.

    ``members``: site-local rows of the cells that seeded this run's codes (``distill_site``); without
    them the seed-targeted and density audits are NaN. ``local``: local-only scores computed
    before for the same ``local_only_key`` (computed here otherwise).
    """
    n_classes = len(req.plan.classes)
    y_all, ok = site.global_labels(req.plan.classes)
    test, val, train = (part[ok[part]] for part in (site.test_idx, site.val_idx, site.train_idx))
    if req.X.shape[1] != len(site.genes) or test.size == 0:
        msg = "synthetic cells do not match the plan's genes, or no held-out cells of the plan's classes"
        raise ProtocolError(msg)
    X_test, y_test, X_train = (
        row_view(site.X, test),
        y_all[test],
        row_view(site.X, train),
    )  # views, scored a block of cells at a time
    y_syn = req.labels.astype(np.int64)
    scores = _scores(X_test, y_test, req, n_classes)
    X_val = row_view(site.X, val)
    val_scores = _scores(X_val, y_all[val], req, n_classes)
    fid = fidelity(X_test, y_test, req.X, y_syn, seed=req.seed)
    val_fid = fidelity(X_val, y_all[val], req.X, y_syn, seed=req.seed)  # what decode choices are made on
    seed_rows = np.flatnonzero(np.isin(train, members)) if members is not None else np.zeros(0, np.int64)
    aud = audit(X_train, y_all[train], seed_rows, X_test, y_test, X_val, req.X, seed=req.seed)
    if local is None:
        local = local_only(
            X_train, y_all[train], X_test, y_test, n_classes, seed=req.seed, rule=mlp_rule(req), device=device
        )
    shared_mlp = _model("mlp", req.mlp_config, req.mlp)
    tuned = fine_tuned(
        shared_mlp, X_train, y_all[train], X_test, y_test, n_classes, seed=req.seed, rule=mlp_rule(req), device=device
    )
    return EvaluateReply(
        req.round,
        int(test.size),
        scores,
        int(val.size),
        val_scores,
        fid.as_dict(),
        aud.as_dict(),
        local,
        val_fid.as_dict(),
        tuned,
    )


LOCAL_LOGREG_MAX_CELLS = 50_000
# The site trains the server's MLP further at this fraction of the local-only rule's learning rate (same steps): chosen
# on validation cells over the rule's own rate and over training on the site's plus the fused synthetic cells
# (benchmarks/fine_tune_screen.py; README, "What each site gains by joining").
FINE_TUNE_LR_SCALE = 0.1


def fine_tuned(
    shared: MLPClassifier,
    X_train: Matrix,
    y_train: np.ndarray,
    X_test: Matrix,
    y_test: np.ndarray,
    n_classes: int,
    *,
    seed: int,
    rule: MLPTrainConfig | None = None,
    device: torch.device = CPU,
) -> dict[str, dict[str, float]]:
    """What the site can deploy after joining: the server's MLP, trained further on the site's own training cells,
    scored on its test cells.

    It follows the local-only rule (``rule``, the server MLP's; ``MLPTrainConfig()`` when None: same steps, same
    seed) at ``FINE_TUNE_LR_SCALE`` of its learning rate, from the shared weights instead of a random start: the
    difference to local-only is what joining gave the site's own model (local adaptation of a federated model: Yu et
    al. 2020, "Salvaging federated learning by local adaptation"). The shared model itself is scored as ``scores``.
    """
    init = {name: t.detach().clone() for name, t in shared.state_dict().items()}
    rule = rule or MLPTrainConfig()
    cfg = replace(rule, lr=rule.lr * FINE_TUNE_LR_SCALE)
    model = train_mlp(X_train, y_train, n_classes, seed=seed, cfg=cfg, init=init, device=device)
    s = score(y_test, predict_mlp(model, X_test))
    return {"mlp": {"accuracy": s.accuracy, "macro_f1": s.macro_f1}}


def local_only(
    X_train: Matrix,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    n_classes: int,
    *,
    seed: int,
    rule: MLPTrainConfig | None = None,
    device: torch.device = CPU,
) -> dict[str, dict[str, float]]:
    """What the site has without joining: each evaluator trained on its own training cells, scored on its test cells.

    The MLP follows ``rule``, the server MLP's training rule (``MLPTrainConfig()`` when None), drawing its minibatches
    from every training cell. The logistic regression's full-batch solver costs time in
    proportion to the cells, so it fits on at most ``LOCAL_LOGREG_MAX_CELLS`` of them (a seeded subset;
    all of them at every site of the team's files).
    """
    rule = rule or MLPTrainConfig()
    out: dict[str, dict[str, float]] = {}
    for ev in LOCAL_EVALUATORS:
        X, y = X_train, y_train
        if ev == "logreg" and y.size > LOCAL_LOGREG_MAX_CELLS:
            pick = np.sort(np.random.default_rng(seed).choice(y.size, LOCAL_LOGREG_MAX_CELLS, replace=False))
            X, y = X[pick], y[pick]
        s = score(y_test, np.asarray(fit_predict(ev, X, y, X_test, n_classes, seed=seed, mlp=rule, device=device)))
        out[ev] = {"accuracy": s.accuracy, "macro_f1": s.macro_f1}
    return out
