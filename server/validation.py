"""Validate every site reply against the plan and the request before the server uses it.

Schema checks (records, keys, dtypes, ranks, finiteness, version) happen in ``from_record``; the
checks here need the run's context: plan sizes, what was sent, what the site reported. Any failure
raises ``ProtocolError`` with a short reason; the orchestrator drops that site for the round.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Protocol, Self, TypeVar

import numpy as np
from flwr.app import RecordDict

from server.privacy import check_report
from shared.counts import MIN_CELLS
from shared.errors import ProtocolError
from shared.models.vae import LOG_MAX
from shared.protocol import (
    DistillReply,
    DistillRequest,
    EvaluateReply,
    Plan,
    PretrainReply,
    PretrainRequest,
    ProfileReply,
    StateDict,
)
from shared.protocol.rounds import LIBRARY_STATS

BUDGET_SLACK_BYTES = 4096
MAX_LOG_LIBRARY = 25.0  # e^25 counts in one cell: anything above is not a cell
MAX_LOG_SD = 10.0


class Decodable(Protocol):
    """A reply payload: ``from_record`` decodes it strictly (``shared.protocol``)."""

    @classmethod
    def from_record(cls, rd: RecordDict) -> Self: ...


P = TypeVar("P", bound=Decodable)


def distill_budget(k: int, n_classes: int, latent_dim: int, n_genes: int = 0) -> int:
    """Most bytes a distill reply may occupy on the wire: k·C·d float32 values, C·3 library statistics, C·``n_genes``
    class means (when the request asked for them), plus 4096 bytes."""
    return (k * n_classes * latent_dim + n_classes * (LIBRARY_STATS + n_genes)) * 4 + BUDGET_SLACK_BYTES


def decode(content: RecordDict, payload: type[P]) -> P:
    """``payload.from_record(content)``, turning unexpected decoder failures into ProtocolError."""
    try:
        return payload.from_record(content)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed input must never crash the server
        msg = f"{payload.__name__} could not be decoded ({type(exc).__name__})"
        raise ProtocolError(msg) from None


def validate_profile(reply: ProfileReply, *, seen_sites: Collection[str]) -> None:
    """Per-gene aggregates must be consistent with n-cells; the site name must be new in this run."""
    if reply.site_name in seen_sites:
        msg = f"duplicated site name {reply.site_name!r}: another SuperNode already answered as this site"
        raise ProtocolError(msg)
    if np.any(reply.sums < 0) or np.any(reply.sumsq < 0):
        msg = "negative per-gene sums or sums of squares (log-normalised data is non-negative)"
        raise ProtocolError(msg)
    if np.any(reply.detected < 0) or np.any(reply.detected > reply.n_cells):
        msg = "per-gene detection counts outside [0, n-cells]"
        raise ProtocolError(msg)
    if np.any(reply.label_counts <= 0) or int(reply.label_counts.sum()) > reply.n_cells:
        msg = "label counts must be positive and sum to at most n-cells"
        raise ProtocolError(msg)


def _same_state(got: StateDict, sent: Mapping[str, np.ndarray], what: str) -> None:
    if list(got) != list(sent):
        missing, extra = sorted(set(sent) - set(got)), sorted(set(got) - set(sent))
        msg = f"{what} weights: keys differ from the sent state dict (missing {missing[:3]}, unexpected {extra[:3]})"
        raise ProtocolError(msg)
    for key, ref in sent.items():
        if got[key].shape != ref.shape or got[key].dtype != ref.dtype:
            msg = (
                f"{what} weights: {key!r} is {got[key].dtype}{list(got[key].shape)}, "
                f"expected {ref.dtype}{list(ref.shape)}"
            )
            raise ProtocolError(msg)


def validate_pretrain(reply: PretrainReply, req: PretrainRequest, *, latent_dim: int) -> None:
    """Stage and round must echo the request; weights must match the sent state dict; counts positive."""
    if reply.stage != req.stage or reply.round != req.round:
        msg = f"reply is for stage {reply.stage!r} round {reply.round}, expected {req.stage!r} round {req.round}"
        raise ProtocolError(msg)
    if reply.num_examples <= 0:
        msg = f"num-examples must be > 0, got {reply.num_examples}"
        raise ProtocolError(msg)
    if reply.stage == "latent-stats":
        s, q = reply.latent_sum, reply.latent_sumsq
        if s is None or q is None or s.shape != (latent_dim,) or q.shape != (latent_dim,) or np.any(q < 0):
            msg = f"latent statistics must be two length-{latent_dim} vectors with non-negative sums of squares"
            raise ProtocolError(msg)
        return
    if reply.stage == "class-means":
        _class_means(reply, req.plan)
        return
    _same_state(reply.weights or {}, req.weights, req.stage)
    if (req.control is None) != (reply.control_delta is None):
        what = "came back but were not requested" if req.control is None else "were requested but none came back"
        msg = f"{req.stage} reply: SCAFFOLD control variates {what}"
        raise ProtocolError(msg)
    if req.control is not None:
        _same_state(reply.control_delta or {}, req.control, f"{req.stage} control-variate")


MAX_RAW_MEAN = 1e6  # a raw released mean is a log-normalised mean plus noise: far below this


def _class_means(reply: PretrainReply, plan: Plan) -> None:
    """(C, G) finite means (raw: noise can make a mean negative) and (C,) non-negative counts for the plan; a class
    without cells has a zero row."""
    means, counts = reply.class_means, reply.class_counts
    shape = (len(plan.classes), len(plan.genes))
    if means is None or counts is None or means.shape != shape or counts.shape != shape[:1]:
        msg = f"class means must be a {shape[0]} x {shape[1]} matrix (plan classes x genes) with {shape[0]} counts"
        raise ProtocolError(msg)
    if not np.all(np.isfinite(means)) or np.any(np.abs(means) > MAX_RAW_MEAN):
        msg = f"class means must be finite and within +-{MAX_RAW_MEAN:g}"
        raise ProtocolError(msg)
    if np.any(counts < 0) or not np.any(counts > 0):
        msg = "class counts must be non-negative, with at least one class released"
        raise ProtocolError(msg)
    if np.any(means[counts == 0] != 0):
        msg = "a class released with 0 cells must have a zero row of means"
        raise ProtocolError(msg)


def validate_distill(
    reply: DistillReply, req: DistillRequest, *, latent_dim: int, site_classes: Collection[int], wire: int
) -> None:
    """Codes (n, d) for classes the site reported, at most k (and at most its training cells) per class, counts of
    length C, within the byte budget."""
    n_classes, k = len(req.plan.classes), req.k
    budget = distill_budget(k, n_classes, latent_dim, len(req.plan.genes) if req.send_class_means else 0)
    if wire > budget:
        msg = f"distill reply is {wire} bytes, over the budget of {budget} (k·C·d·4 + {BUDGET_SLACK_BYTES})"
        raise ProtocolError(msg)
    if reply.round != req.round:
        msg = f"reply is for round {reply.round}, expected {req.round}"
        raise ProtocolError(msg)
    if reply.codes.shape[1] != latent_dim:
        msg = f"codes have {reply.codes.shape[1]} dimensions, expected the latent dimension {latent_dim}"
        raise ProtocolError(msg)
    labels = reply.labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= n_classes:
        msg = f"code labels outside the plan's {n_classes} class ids"
        raise ProtocolError(msg)
    unreported = sorted(set(np.unique(labels).tolist()) - set(site_classes))
    if unreported:
        msg = f"codes for {len(unreported)} class(es) this site did not report in its profile"
        raise ProtocolError(msg)
    per_class = np.bincount(labels, minlength=n_classes)
    if per_class.max() > k:
        msg = f"{int(per_class.max())} codes for one class, at most k={k} allowed"
        raise ProtocolError(msg)
    counts = reply.class_counts
    if counts.shape != (n_classes,) or np.any(counts < 0):
        msg = f"class counts must be {n_classes} non-negative integers"
        raise ProtocolError(msg)
    if np.any((per_class > 0) & (counts == 0)):
        msg = "codes for a class with zero reported cells"
        raise ProtocolError(msg)
    if np.any(per_class > counts):
        msg = "more codes than reported training cells for a class (a site distills at most one code per cell)"
        raise ProtocolError(msg)
    if not math.isfinite(reply.distill_seconds) or reply.distill_seconds < 0:
        msg = "distill-seconds must be a non-negative number"
        raise ProtocolError(msg)
    dp = req.plan.spec.dp
    if dp.enabled and not dp.library_stats and np.isfinite(reply.library).any():
        msg = "library statistics from a site whose DP plan releases none (statistics pretraining): unbudgeted"
        raise ProtocolError(msg)
    _check_library(reply.library, counts)
    _check_class_means(reply.class_means, counts, asked=req.send_class_means, n_genes=len(req.plan.genes))
    check_report(reply.privacy, dp_on=dp.enabled, target=dp.epsilon)


def _check_class_means(means: np.ndarray | None, class_counts: np.ndarray, *, asked: bool, n_genes: int) -> None:
    """Class means only when asked: a (C, G) matrix of complete rows within the log-normalised range, each for a class
    of at least MIN_CELLS reported cells, NaN rows elsewhere."""
    if means is None:
        if asked:
            msg = "the request asked for class means (recenter) and the reply has none"
            raise ProtocolError(msg)
        return
    if not asked:
        msg = "class means the request did not ask for: refused, they would leave the site unannounced"
        raise ProtocolError(msg)
    if means.shape != (class_counts.shape[0], n_genes):
        msg = f"class means have shape {means.shape}, expected ({class_counts.shape[0]}, {n_genes}) (classes x genes)"
        raise ProtocolError(msg)
    given = np.isfinite(means)
    rows = given.all(1)
    if np.any(given.any(1) != rows) or np.any(rows & (class_counts < MIN_CELLS)):
        msg = f"class means must be complete rows, and only for classes of at least {MIN_CELLS} training cells"
        raise ProtocolError(msg)
    if np.any(means[rows] < 0) or np.any(means[rows] > LOG_MAX):
        msg = f"class means must lie within the log-normalised range [0, {LOG_MAX:.3f}]"
        raise ProtocolError(msg)


def _check_library(library: np.ndarray, class_counts: np.ndarray) -> None:
    """Per class: all NaN (no such cells, or no count input), or a plausible mean / sd of log totals and a plan share in
    (0, 1]."""
    if library.shape != (class_counts.shape[0], LIBRARY_STATS):
        msg = f"library statistics have shape {library.shape}, expected ({class_counts.shape[0]}, {LIBRARY_STATS})"
        raise ProtocolError(msg)
    given = np.isfinite(library)
    if np.any(given.any(1) != given.all(1)) or np.any(given.all(1) & (class_counts == 0)):
        msg = "library statistics must be complete rows, and only for classes with training cells"
        raise ProtocolError(msg)
    rows = library[given.all(1)]
    if rows.size and not (
        np.all((rows[:, 0] >= 0) & (rows[:, 0] <= MAX_LOG_LIBRARY))
        and np.all((rows[:, 1] >= 0) & (rows[:, 1] <= MAX_LOG_SD))
        and np.all((rows[:, 2] > 0) & (rows[:, 2] <= 1))
    ):
        msg = (
            f"library statistics out of range (log totals in [0, {MAX_LOG_LIBRARY:g}], "
            f"their sd in [0, {MAX_LOG_SD:g}], plan share in (0, 1])"
        )
        raise ProtocolError(msg)


def unit(v: float, *, allow_nan: bool = False) -> bool:
    """v in [0, 1] (or NaN where allowed)."""
    return (allow_nan and math.isnan(v)) or (math.isfinite(v) and 0.0 <= v <= 1.0)


def _fidelity_ok(fid: Mapping[str, float]) -> bool:
    """Fractions and the marker overlap in [0, 1], correlations in [-1, 1], the MMD >= 0 (NaN: not computable)."""
    fractions = [fid["zero_fraction_real"], fid["zero_fraction_synthetic"], fid["marker_overlap"]]
    correlations_ok = all(math.isnan(fid[k]) or -1 <= fid[k] <= 1 for k in ("mean_corr", "var_corr"))
    return (
        all(unit(v, allow_nan=True) for v in fractions)
        and (math.isnan(fid["mmd_pca"]) or fid["mmd_pca"] >= 0)
        and correlations_ok
    )


def validate_evaluate(reply: EvaluateReply, *, round_: int, n_classes: int) -> None:
    """Scores in [0, 1] (NaN only where a metric is undefined), recall of length C, n-test positive, audit and fidelity
    in range."""
    if reply.round != round_:
        msg = f"reply is for round {reply.round}, expected {round_}"
        raise ProtocolError(msg)
    if reply.n_test <= 0 or reply.n_val < 0:
        msg = f"n-test must be > 0 and n-val >= 0, got {reply.n_test} and {reply.n_val}"
        raise ProtocolError(msg)

    for part, scores, has_cells in (("test", reply.scores, True), ("validation", reply.val_scores, reply.n_val > 0)):
        for ev, s in scores.items():
            if len(s.recall) != n_classes:
                msg = f"{ev} {part} recall has {len(s.recall)} entries, expected one per plan class ({n_classes})"
                raise ProtocolError(msg)
            if not (
                unit(s.accuracy, allow_nan=not has_cells)
                and unit(s.macro_f1, allow_nan=not has_cells)
                and all(unit(r, allow_nan=True) for r in s.recall)
            ):
                msg = f"{ev} {part} scores outside [0, 1]"
                raise ProtocolError(msg)
    local = [v for block in (reply.local_only, reply.fine_tuned) for per_ev in block.values() for v in per_ev.values()]
    in_unit = [*reply.audit.values(), *local]
    fids_ok = all(_fidelity_ok(f) for f in (reply.fidelity, reply.val_fidelity))
    if not all(unit(v, allow_nan=True) for v in in_unit) or not fids_ok:
        msg = "fidelity, privacy-audit, local-only or fine-tuned numbers out of range"
        raise ProtocolError(msg)
