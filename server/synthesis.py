"""Coordinator-side model work: fresh models, decoding and fusing codes, fine-tuning the SCDG, evaluation models."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import anndata as ad
import numpy as np
import torch

from shared.checkpoint import model_hash
from shared.counts import sample_counts, usable
from shared.distill import Codes, generate, latents
from shared.evaluation import MLPTrainConfig, fit_logreg, train_mlp
from shared.fitting import TrainConfig, fit_scdg
from shared.models import SCDG, VAE, MLPClassifier
from shared.models.vae import LOG_MAX, DecodeMode, gaussian_cells
from shared.pretrain import new_models
from shared.protocol import Plan
from shared.synthetic import fuse, to_anndata

logger = logging.getLogger(__name__)


def fresh_models(
    plan: Plan, *, latent_dim: int, seed: int, count_head: bool = False, site_dim: int = 0
) -> tuple[VAE, SCDG]:
    """A new VAE (with a count head when every site has count input, a site vector of ``site_dim``) and SCDG for the
    plan's genes and classes (seeded)."""
    torch.manual_seed(seed)
    vae, scdg = new_models(len(plan.genes), len(plan.classes), latent_dim, count_head=count_head, site_dim=site_dim)
    vae.eval()
    scdg.eval()
    return vae, scdg


@dataclass(frozen=True)
class SiteCodes:
    """One site's validated codes of one round."""

    site: str
    codes: Codes
    distill_seconds: float = float("nan")
    upload_bytes: int = 0
    library: np.ndarray | None = (
        None  # (C, 3) per-class library statistics (shared.counts); NaN rows without count input
    )
    site_vector: np.ndarray | None = None  # site-covariate "own": the site's VAE site vector its codes decode with
    # recenter (without DP): (C, G) gene means of the site's training cells per class, NaN rows where it sent none
    class_means: np.ndarray | None = None


DRAWING_MODES = ("sample", "counts", "gaussian")  # decode modes that draw samples_per_code cells from every code


def counts_available(parts: Sequence[SiteCodes], vae: VAE) -> bool:
    """Synthetic counts need the VAE's count head and every contributing site's library statistics for its classes."""
    return vae.count_head is not None and all(
        p.library is not None and usable(p.library, p.codes.labels) for p in parts
    )


RecenterHow = Literal["shift", "scale"]
SCALE_CAP = 20.0  # "scale": no gene of a class is multiplied by more than this
_FLAT = 1e-6  # "scale": a gene whose decoded class mean is at most this is shifted instead


def recenter(X: np.ndarray, labels: np.ndarray, means: np.ndarray, how: RecenterHow = "shift") -> np.ndarray:
    """``X`` with each class's rows moved so that their mean is that class's row of ``means`` (clipped to the
    log-normalised range); a class whose row of ``means`` is all zero (its name was not released) is left alone.

    "shift" adds the difference to every row; "scale" multiplies each gene's values by the ratio of the means (at most
    ``SCALE_CAP``; a gene the decoder leaves at zero for the class is shifted), so that a zero stays a zero and a gene's
    spread grows and shrinks with its mean.
    """
    out = np.array(X, dtype=np.float32, copy=True)
    for c in np.unique(labels):
        target = np.asarray(means[c], dtype=np.float64)
        if not np.any(target > 0):
            continue
        rows = labels == c
        current = out[rows].mean(axis=0, dtype=np.float64)
        if how == "shift":
            out[rows] += (target - current).astype(np.float32)
            continue
        flat = current <= _FLAT
        ratio = np.where(flat, 1.0, np.clip(target / np.maximum(current, _FLAT), 0.0, SCALE_CAP))
        out[rows] = out[rows] * ratio.astype(np.float32) + np.where(flat, target - current, 0.0).astype(np.float32)
    return np.clip(out, 0.0, LOG_MAX)


def fuse_round(
    parts: Sequence[SiteCodes],
    vae: VAE,
    scdg: SCDG,
    plan: Plan,
    *,
    round_: int,
    provenance: dict[str, Any],
    mode: DecodeMode,
    seed: int,
    samples_per_code: int = 1,
    class_means: Mapping[str, np.ndarray] | None = None,
    recenter_how: RecenterHow = "shift",
) -> ad.AnnData:
    """Decode every site's codes with the generator they were made with and fuse them into one AnnData.

    With count input at every site, each cell also gets sampled counts (``layers["counts"]``) and the
    decoder's expected expression (``layers["expected"]``); ``X`` holds what ``mode`` asks for, where
    "counts" (X = the sampled counts, log-normalised like the real cells) falls back to "expected"
    when counts are not available. The drawing modes (``DRAWING_MODES``) draw ``samples_per_code`` cells from every
    code. ``class_means`` (per site, (C, G): the class means it released, as the coordinator denoised them under DP
    statistics pretraining with ``dp-recenter``, or its training cells' means it sent with its codes under
    ``recenter``; a zero row leaves its class alone): in the "expected" and "gaussian" modes, each class's expected
    expression is moved onto its mean (``recenter``, as ``recenter_how`` says) before X is taken or drawn from it;
    ``layers["expected"]`` keeps the decoder's own.
    """
    with_counts = counts_available(parts, vae)
    if mode == "counts" and not with_counts:
        logger.warning(
            "decode-mode 'counts' needs count input at every site (and a VAE trained with it): "
            "decoding 'expected' instead"
        )
        mode = "expected"
    repeat = samples_per_code if mode in DRAWING_MODES else 1
    moved = recenter_how if class_means and mode in ("expected", "gaussian") else "off"
    provenance = {**provenance, "decode": mode, "samples_per_code": repeat, "recenter": moved}
    pieces = []
    for i, part in enumerate(sorted(parts, key=lambda p: p.site)):
        seed_i = seed + 1000 * i
        codes = (
            part.codes
            if repeat == 1
            else dataclasses.replace(
                part.codes,
                codes=np.repeat(part.codes.codes, repeat, axis=0),
                labels=np.repeat(part.codes.labels, repeat),
            )
        )
        with vae.as_site(part.site_vector) as site_vae:  # the VAE's average site vector without one
            layers = {"expected": generate(site_vae, scdg, codes, mode="expected")}
            if with_counts:
                library = cast(np.ndarray, part.library)  # counts_available: every site sent its statistics
                layers["counts"], counts_X = sample_counts(
                    site_vae, latents(scdg, codes), codes.labels, library, seed=seed_i
                )
            if class_means is not None and part.site in class_means and mode in ("expected", "gaussian"):
                shifted = recenter(layers["expected"], codes.labels, class_means[part.site], recenter_how)
                cells = (  # "gaussian": the public cell model around it, seeded as `generate` seeds it
                    shifted
                    if mode == "expected"
                    else gaussian_cells(torch.as_tensor(shifted), torch.Generator().manual_seed(seed_i)).numpy()
                )
            else:
                cells = (
                    counts_X
                    if mode == "counts"
                    else layers["expected"]
                    if mode == "expected"
                    else generate(site_vae, scdg, codes, mode=mode, seed=seed_i)
                )
        pieces.append(
            to_anndata(
                cells,
                codes.labels,
                class_names=plan.classes,
                genes=plan.genes,
                label_key=plan.spec.label_key,
                site=part.site,
                round_=round_,
                provenance=provenance,
                layers=layers,
            )
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata: duplicate obs names before fuse() renames them
        fused = fuse(pieces)
    fused.uns["fedscdd"] = pieces[0].uns["fedscdd"]
    return fused


def finetune_generator(
    scdg: SCDG, parts: Sequence[SiteCodes], *, steps: int, lr: float, anchor_weight: float, seed: int
) -> list[float]:
    """Fine-tune the SCDG on the fused one-step estimates ẑ₀ of all codes, pulled toward its pre-round weights."""
    if steps <= 0 or not parts:
        return []
    with torch.no_grad():
        zs, ys = [], []
        for p in parts:
            w = torch.as_tensor(p.codes.codes, dtype=torch.float32)
            y = torch.as_tensor(p.codes.labels, dtype=torch.long)
            zs.append(scdg.unstandardize(scdg.one_step(w, p.codes.t_star, y, p.codes.guidance)))
            ys.append(y)
        Z, labels = torch.cat(zs).numpy(), torch.cat(ys).numpy()
    anchor = {k: v.detach().clone() for k, v in scdg.state_dict().items()}
    cfg = TrainConfig(steps=steps, lr=lr, batch_size=256, seed=seed)
    return fit_scdg(scdg, Z, labels, cfg, anchor=anchor, anchor_weight=anchor_weight)


@dataclass(frozen=True, eq=False)
class EvalModels:
    """Models trained on the fused synthetic cells, in the form sent to the sites."""

    mlp: MLPClassifier
    coef: np.ndarray
    intercept: np.ndarray
    classes: np.ndarray


def train_evaluators(X: np.ndarray, y: np.ndarray, n_classes: int, *, mlp: MLPTrainConfig, seed: int) -> EvalModels:
    """The MLP and a logistic regression, trained on synthetic cells only."""
    model = train_mlp(X, y, n_classes, seed=seed, cfg=mlp)
    present = np.unique(y)
    if present.size < 2:
        coef, icpt = np.zeros((1, X.shape[1])), np.zeros(1)
    else:
        lr = fit_logreg(X, y, seed=seed)
        coef, icpt = lr.coef_.astype(np.float64), lr.intercept_.astype(np.float64)
    return EvalModels(model, coef, icpt, present.astype(np.int64))


def provenance(
    vae: VAE, scdg: SCDG, *, round_: int, sites: Sequence[str], distill: dict[str, Any], decode: str
) -> dict[str, Any]:
    """What made a fused synthetic set (stored in uns)."""
    return {
        "method": "fedscdd",
        "round": round_,
        "sites": list(sites),
        "distill": distill,
        "decode_mode": decode,
        "vae_hash": model_hash(vae),
        "scdg_hash": model_hash(scdg),
    }
