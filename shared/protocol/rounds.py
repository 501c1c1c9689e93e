"""Payloads of train.distill and evaluate.models: frozen dataclasses with strict to_record/from_record."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from shared.audit import AUDIT_KEYS
from shared.protocol.codec import (
    ABSENT,
    ABSENT_CORR,
    EVALUATORS,
    KEY_CLASS_MEANS,
    KEY_CODES,
    KEY_CONFIG,
    KEY_DISTILL,
    KEY_LOGREG,
    KEY_METRICS,
    KEY_MLP,
    KEY_PLAN,
    KEY_PLAN_GENES,
    KEY_SCDG,
    KEY_SYNTHETIC,
    KEY_VAE,
    KEY_WARM,
    SCHEMA_KEY,
    Plan,
    StateDict,
    array_record,
    check_keys,
    check_records,
    check_round,
    config_record,
    fail,
    get_array,
    get_float_list,
    get_str_list,
    get_value,
    nan_to_wire,
    state_from_record,
    state_record,
    wire_to_nan,
)

DistillValue = int | float | str | bool
PRIVACY_KEYS = (
    "epsilon",
    "delta",
    "noise_multiplier_sgd",
    "noise_multiplier_stats",
)  # a DP site's report in the distill reply
LIBRARY_STATS = 3  # per class: mean and sd of log total counts per cell, mean fraction of counts on the plan genes


# ----------------------------------------------------------------------------- train.distill
@dataclass(frozen=True, eq=False)
class DistillRequest:
    """Server -> site: distill k codes per local class through these generator weights."""

    round: int
    vae: StateDict
    vae_config: str
    scdg: StateDict
    scdg_config: str
    plan: Plan
    distill: Mapping[str, DistillValue]  # DistillConfig fields (k, iterations, ...), seed excluded
    seed: int
    warm_start: bool = True  # start from the site's codes of the previous round
    # This site's own codes and labels of the previous round, sent back by the server (which keeps them across
    # a resume); absent in round 1. Only the site that made them receives them.
    warm_codes: np.ndarray | None = None  # float32 (n, d)
    warm_labels: np.ndarray | None = None  # int32 (n,)
    # Under DP statistics pretraining: this site's released class means as the coordinator denoised them (alone or with
    # every site's, run config dp-denoise; shared.privacy.denoise); the objective matches them.
    class_means: np.ndarray | None = None  # float32 (C, G), non-negative
    # Without DP, run config recenter: the site sends its training cells' per-class gene means with its codes (classes
    # of at least shared.counts.MIN_CELLS cells), and the coordinator moves its decoded cells of each class onto them.
    send_class_means: bool = False

    def to_record(self) -> RecordDict:
        """Encode."""
        cfg = config_record(
            {
                "round": self.round,
                "vae-config": self.vae_config,
                "scdg-config": self.scdg_config,
                "seed": self.seed,
                "warm-start": bool(self.warm_start),
                "send-class-means": bool(self.send_class_means),
            }
        )
        rd = RecordDict(
            {
                KEY_CONFIG: cfg,
                KEY_DISTILL: config_record(dict(self.distill)),
                KEY_VAE: state_record(self.vae),
                KEY_SCDG: state_record(self.scdg),
                **self.plan.records(),
            }
        )
        if self.warm_codes is not None and self.warm_labels is not None:
            rd[KEY_WARM] = ArrayRecord(
                {
                    "codes": Array(np.ascontiguousarray(self.warm_codes, np.float32)),
                    "labels": Array(np.asarray(self.warm_labels, np.int32)),
                }
            )
        if self.class_means is not None:
            rd[KEY_CLASS_MEANS] = ArrayRecord({"means": Array(np.ascontiguousarray(self.class_means, np.float32))})
        return rd

    @classmethod
    def from_record(cls, rd: RecordDict) -> DistillRequest:
        """Decode strictly."""
        where = "distill request"
        warm, means = KEY_WARM in rd, KEY_CLASS_MEANS in rd
        check_records(
            rd,
            where,
            configs=[KEY_CONFIG, KEY_DISTILL, KEY_PLAN],
            arrays=[KEY_VAE, KEY_SCDG, KEY_PLAN_GENES]
            + ([KEY_WARM] if warm else [])
            + ([KEY_CLASS_MEANS] if means else []),
        )
        cfg = rd[KEY_CONFIG]
        check_keys(
            cfg, {SCHEMA_KEY, "round", "vae-config", "scdg-config", "seed", "warm-start", "send-class-means"}, where
        )
        distill: dict[str, Any] = {k: v for k, v in rd[KEY_DISTILL].items() if k != SCHEMA_KEY}
        bad = [
            k
            for k, v in distill.items()
            if not isinstance(v, (int, float, str, bool)) or (isinstance(v, float) and not math.isfinite(v))
        ]
        if bad or not isinstance(distill.get("k"), int) or distill["k"] < 1:
            raise fail(where, f"distill config needs an integer k >= 1 and finite scalar values (bad: {sorted(bad)})")
        plan = Plan.from_records(rd, where)
        return cls(
            round=check_round(get_value(cfg, "round", int, where), where),
            vae=state_from_record(array_record(rd, KEY_VAE), where),
            vae_config=get_value(cfg, "vae-config", str, where),
            scdg=state_from_record(array_record(rd, KEY_SCDG), where),
            scdg_config=get_value(cfg, "scdg-config", str, where),
            plan=plan,
            distill=distill,
            seed=get_value(cfg, "seed", int, where),
            warm_start=get_value(cfg, "warm-start", bool, where),
            send_class_means=get_value(cfg, "send-class-means", bool, where),
            **(_warm_arrays(array_record(rd, KEY_WARM), where) if warm else {}),
            class_means=_class_means(array_record(rd, KEY_CLASS_MEANS), plan, where) if means else None,
        )

    @property
    def k(self) -> int:
        """Codes per class."""
        return int(self.distill["k"])


def _class_means(record: ArrayRecord, plan: Plan, where: str) -> np.ndarray:
    check_keys(record, {"means"}, where)
    means = get_array(record, "means", "float32", 2, where)
    shape = (len(plan.classes), len(plan.genes))
    if means.shape != shape or np.any(means < 0):  # get_array refuses NaN and Inf
        raise fail(
            where, f"class means must be a finite, non-negative {shape[0]} x {shape[1]} matrix (classes x genes)"
        )
    return means


def _warm_arrays(record: ArrayRecord, where: str) -> dict[str, np.ndarray]:
    check_keys(record, {"codes", "labels"}, where)
    codes, labels = get_array(record, "codes", "float32", 2, where), get_array(record, "labels", "int32", 1, where)
    if labels.shape[0] != codes.shape[0] or codes.shape[0] == 0:
        raise fail(where, f"warm start has {codes.shape[0]} codes but {labels.shape[0]} labels")
    return {"warm_codes": codes, "warm_labels": labels}


@dataclass(frozen=True, eq=False)
class DistillReply:
    """Site -> server: codes (n, d) float32, their global class ids, training cells per plan class, library statistics.

    ``library`` (C, 3) holds, per plan class, the mean and standard deviation of log total counts per
    cell and the mean fraction of a cell's counts that falls on the plan genes, over the site's training
    cells (what the server needs to turn the count head's proportions into counts); NaN rows for classes
    the site does not have and for sites without count input.
    """

    round: int
    codes: np.ndarray  # float32 (n, d)
    labels: np.ndarray  # int32 (n,)
    class_counts: np.ndarray  # int64 (C,)
    distill_seconds: float
    library: np.ndarray  # float32 (C, 3)
    # under DP: what the site's accountant says it spent over the run (PRIVACY_KEYS: epsilon, delta, noise multipliers;
    # "mechanisms": one line per release); None without DP
    privacy: Mapping[str, Any] | None = None
    # when the request asked for them (send_class_means): float32 (C, G) per-class gene means of the site's training
    # cells, NaN rows for classes of fewer than shared.counts.MIN_CELLS cells (and classes it does not have)
    class_means: np.ndarray | None = None

    def to_record(self) -> RecordDict:
        """Encode."""
        arrays = ArrayRecord(
            {
                "codes": Array(np.ascontiguousarray(self.codes, np.float32)),
                "labels": Array(np.asarray(self.labels, np.int32)),
                "class-counts": Array(np.asarray(self.class_counts, np.int64)),
                "library": Array(np.ascontiguousarray(self.library, np.float32)),
            }
        )
        if self.class_means is not None:
            arrays["class-means"] = Array(np.ascontiguousarray(self.class_means, np.float32))
        cfg: dict[str, Any] = {"round": self.round}
        metrics: dict[str, Any] = {"distill-seconds": float(self.distill_seconds)}
        if self.privacy is not None:
            cfg["dp-mechanisms"] = [str(m) for m in self.privacy["mechanisms"]]
            metrics |= {f"dp-{_wire(k)}": float(self.privacy[k]) for k in PRIVACY_KEYS}
        return RecordDict({KEY_CONFIG: config_record(cfg), KEY_CODES: arrays, KEY_METRICS: MetricRecord(metrics)})

    @classmethod
    def from_record(cls, rd: RecordDict) -> DistillReply:
        """Decode strictly."""
        where = "distill reply"
        check_records(rd, where, configs=[KEY_CONFIG], arrays=[KEY_CODES], metrics=[KEY_METRICS])
        private = "dp-mechanisms" in rd[KEY_CONFIG]
        check_keys(rd[KEY_CONFIG], {SCHEMA_KEY, "round", *(["dp-mechanisms"] if private else [])}, where)
        means = "class-means" in rd[KEY_CODES]
        check_keys(
            rd[KEY_CODES], {"codes", "labels", "class-counts", "library", *(["class-means"] if means else [])}, where
        )
        check_keys(
            rd[KEY_METRICS], {"distill-seconds", *([f"dp-{_wire(k)}" for k in PRIVACY_KEYS] if private else [])}, where
        )
        report: dict[str, Any] | None = None
        if private:
            report = {k: get_value(rd[KEY_METRICS], f"dp-{_wire(k)}", float, where) for k in PRIVACY_KEYS}
            report["mechanisms"] = list(get_str_list(rd[KEY_CONFIG], "dp-mechanisms", where))
        codes = get_array(array_record(rd, KEY_CODES), "codes", "float32", 2, where)
        labels = get_array(array_record(rd, KEY_CODES), "labels", "int32", 1, where)
        if labels.shape[0] != codes.shape[0] or codes.shape[0] == 0:
            raise fail(
                where,
                f"{codes.shape[0]} codes but {labels.shape[0]} labels (need one label per code, at least one code)",
            )
        library = get_array(array_record(rd, KEY_CODES), "library", "float32", 2, where, allow_nan=True)
        if library.shape[1:] != (LIBRARY_STATS,):
            raise fail(where, f"library statistics have shape {library.shape}, expected (classes, {LIBRARY_STATS})")
        return cls(
            round=check_round(get_value(rd[KEY_CONFIG], "round", int, where), where),
            codes=codes,
            labels=labels,
            class_counts=get_array(array_record(rd, KEY_CODES), "class-counts", "int64", 1, where),
            distill_seconds=get_value(rd[KEY_METRICS], "distill-seconds", float, where),
            library=library,
            privacy=report,
            class_means=(
                get_array(array_record(rd, KEY_CODES), "class-means", "float32", 2, where, allow_nan=True)
                if means
                else None
            ),
        )


# ----------------------------------------------------------------------------- evaluate.models
@dataclass(frozen=True, eq=False)
class EvaluateRequest:
    """Server -> site: score these models (trained on the fused synthetic cells, which are sent too)."""

    round: int
    X: np.ndarray  # float32 (n, G) synthetic cells
    labels: np.ndarray  # int32 (n,)
    mlp: StateDict
    mlp_config: str
    logreg_coef: np.ndarray  # float64 (r, G)
    logreg_intercept: np.ndarray  # float64 (r,)
    logreg_classes: np.ndarray  # int64 (m,) global ids the logistic regression was fitted on
    plan: Plan
    seed: int
    # The MLP training rule the server's MLP followed (run config mlp-epochs / mlp-min-steps / mlp-max-steps): the
    # site trains its local-only and fine-tuned MLPs by the same rule, so that only their cells differ.
    mlp_epochs: float
    mlp_min_steps: int
    mlp_max_steps: int

    def to_record(self) -> RecordDict:
        """Encode."""
        syn = ArrayRecord(
            {"X": Array(np.ascontiguousarray(self.X, np.float32)), "labels": Array(np.asarray(self.labels, np.int32))}
        )
        lr = ArrayRecord(
            {
                "coef": Array(np.ascontiguousarray(self.logreg_coef, np.float64)),
                "intercept": Array(np.asarray(self.logreg_intercept, np.float64)),
                "classes": Array(np.asarray(self.logreg_classes, np.int64)),
            }
        )
        cfg = config_record(
            {
                "round": self.round,
                "mlp-config": self.mlp_config,
                "seed": self.seed,
                "mlp-epochs": float(self.mlp_epochs),
                "mlp-min-steps": self.mlp_min_steps,
                "mlp-max-steps": self.mlp_max_steps,
            }
        )
        return RecordDict(
            {
                KEY_CONFIG: cfg,
                KEY_SYNTHETIC: syn,
                KEY_MLP: state_record(self.mlp),
                KEY_LOGREG: lr,
                **self.plan.records(),
            }
        )

    @classmethod
    def from_record(cls, rd: RecordDict) -> EvaluateRequest:
        """Decode strictly."""
        where = "evaluate request"
        check_records(
            rd, where, configs=[KEY_CONFIG, KEY_PLAN], arrays=[KEY_SYNTHETIC, KEY_MLP, KEY_LOGREG, KEY_PLAN_GENES]
        )
        cfg, syn, lr = rd[KEY_CONFIG], array_record(rd, KEY_SYNTHETIC), array_record(rd, KEY_LOGREG)
        check_keys(
            cfg, {SCHEMA_KEY, "round", "mlp-config", "seed", "mlp-epochs", "mlp-min-steps", "mlp-max-steps"}, where
        )
        check_keys(syn, {"X", "labels"}, where)
        check_keys(lr, {"coef", "intercept", "classes"}, where)
        X, labels = get_array(syn, "X", "float32", 2, where), get_array(syn, "labels", "int32", 1, where)
        coef, icpt = get_array(lr, "coef", "float64", 2, where), get_array(lr, "intercept", "float64", 1, where)
        classes = get_array(lr, "classes", "int64", 1, where)
        if (
            X.shape[0] != labels.shape[0]
            or X.shape[0] == 0
            or coef.shape[0] != icpt.shape[0]
            or coef.shape[1] != X.shape[1]
        ):
            raise fail(where, "synthetic cells/labels or logistic-regression shapes are inconsistent")
        epochs = get_value(cfg, "mlp-epochs", float, where)
        lo, hi = get_value(cfg, "mlp-min-steps", int, where), get_value(cfg, "mlp-max-steps", int, where)
        if not (math.isfinite(epochs) and epochs > 0 and 1 <= lo <= hi):
            raise fail(
                where,
                f"MLP rule needs mlp-epochs > 0 and 1 <= mlp-min-steps <= mlp-max-steps; got {epochs}, {lo}, {hi}",
            )
        return cls(
            round=check_round(get_value(cfg, "round", int, where), where),
            X=X,
            labels=labels,
            mlp=state_from_record(array_record(rd, KEY_MLP), where),
            mlp_config=get_value(cfg, "mlp-config", str, where),
            logreg_coef=coef,
            logreg_intercept=icpt,
            logreg_classes=classes,
            plan=Plan.from_records(rd, where),
            seed=get_value(cfg, "seed", int, where),
            mlp_epochs=epochs,
            mlp_min_steps=lo,
            mlp_max_steps=hi,
        )


@dataclass(frozen=True)
class EvaluatorScores:
    """One evaluator's scores on a site's held-out real cells (NaN recall = class absent there)."""

    accuracy: float
    macro_f1: float
    recall: tuple[float, ...]  # length C


FIDELITY_KEYS = ("mmd_pca", "mean_corr", "var_corr", "marker_overlap", "zero_fraction_real", "zero_fraction_synthetic")
CORRELATIONS = ("mean_corr", "var_corr")  # in [-1, 1]; the others are >= 0


# what a site trains on its own cells for the local-only comparison
LOCAL_EVALUATORS: tuple[Literal["mlp", "logreg"], ...] = ("mlp", "logreg")
# what a site trains further from the server's weights on its own cells (client.tasks.fine_tuned); not the logistic
# regression: its L2-regularised loss is strictly convex, so training it further on the site's cells ends where
# local-only's does, whatever the start
TUNED_EVALUATORS: tuple[Literal["mlp"], ...] = ("mlp",)
SCORE_PARTS = ("accuracy", "macro_f1")


def _wire(key: str) -> str:
    return key.replace("_", "-")


def _scores_to_wire(prefix: str, scores: Mapping[str, EvaluatorScores]) -> dict[str, Any]:
    m: dict[str, Any] = {}
    for ev in EVALUATORS:
        s = scores[ev]
        m |= {
            f"{prefix}{ev}-accuracy": nan_to_wire(s.accuracy),
            f"{prefix}{ev}-macro-f1": nan_to_wire(s.macro_f1),
            f"{prefix}{ev}-recall": [nan_to_wire(r) for r in s.recall],
        }
    return m


def _scores_from_wire(prefix: str, m: Mapping[str, Any], where: str) -> dict[str, EvaluatorScores]:
    return {
        ev: EvaluatorScores(
            wire_to_nan(get_value(m, f"{prefix}{ev}-accuracy", float, where)),
            wire_to_nan(get_value(m, f"{prefix}{ev}-macro-f1", float, where)),
            tuple(wire_to_nan(r) for r in get_float_list(m, f"{prefix}{ev}-recall", where)),
        )
        for ev in EVALUATORS
    }


@dataclass(frozen=True)
class EvaluateReply:
    """Site -> server: scores per evaluator on test and validation cells, fidelity and the privacy audit (NaN = not
    computable).

    Schema 2 added validation scores, the four-part privacy audit (``shared.audit``) and two fidelity numbers
    (per-gene variance correlation, marker-gene overlap); schema 3 the local-only scores, schema 9 the fine-tuned ones,
    schema 12 the audit's chance bounds (``*_null95``).
    """

    round: int
    n_test: int
    scores: Mapping[str, EvaluatorScores]  # keys: EVALUATORS; on the site's held-out test cells
    n_val: int
    val_scores: Mapping[
        str, EvaluatorScores
    ]  # the same on the site's validation cells (for choices; NaN when it has none)
    fidelity: Mapping[str, float]  # keys: FIDELITY_KEYS
    audit: Mapping[str, float]  # keys: AUDIT_KEYS
    # a model trained on this site's own training cells only, on the same test cells: what the site has without joining
    local_only: Mapping[str, Mapping[str, float]] = field(
        default_factory=dict
    )  # LOCAL_EVALUATORS -> {"accuracy", "macro_f1"}
    # fidelity against the site's validation cells (what decode choices are made on); keys FIDELITY_KEYS, NaN without
    # validation cells
    val_fidelity: Mapping[str, float] = field(default_factory=dict)
    # the server's MLP trained further on this site's training cells (the local-only rule's steps at a tenth of its
    # learning rate), on the same test cells: what the site can deploy after joining
    fine_tuned: Mapping[str, Mapping[str, float]] = field(
        default_factory=dict
    )  # TUNED_EVALUATORS -> {"accuracy", "macro_f1"}

    def to_record(self) -> RecordDict:
        """Encode (NaN travels as ABSENT / ABSENT_CORR)."""
        m: dict[str, Any] = {
            "n-test": int(self.n_test),
            "n-val": int(self.n_val),
            **_scores_to_wire("", self.scores),
            **_scores_to_wire("val-", self.val_scores),
        }
        for key in FIDELITY_KEYS:
            m[_wire(key)] = nan_to_wire(self.fidelity[key], ABSENT_CORR if key in CORRELATIONS else ABSENT)
            m["val-" + _wire(key)] = nan_to_wire(
                self.val_fidelity.get(key, float("nan")), ABSENT_CORR if key in CORRELATIONS else ABSENT
            )
        for key in AUDIT_KEYS:
            m[_wire(key)] = nan_to_wire(self.audit[key])
        for prefix, evs, vals in (
            ("local", LOCAL_EVALUATORS, self.local_only),
            ("tuned", TUNED_EVALUATORS, self.fine_tuned),
        ):
            for ev in evs:
                for part in SCORE_PARTS:
                    m[f"{prefix}-{ev}-{_wire(part)}"] = nan_to_wire(vals.get(ev, {}).get(part, float("nan")))
        return RecordDict({KEY_CONFIG: config_record({"round": self.round}), KEY_METRICS: MetricRecord(m)})

    @classmethod
    def from_record(cls, rd: RecordDict) -> EvaluateReply:
        """Decode strictly."""
        where = "evaluate reply"
        check_records(rd, where, configs=[KEY_CONFIG], metrics=[KEY_METRICS])
        check_keys(rd[KEY_CONFIG], {SCHEMA_KEY, "round"}, where)
        m = rd[KEY_METRICS]
        score_keys = {
            f"{p}{ev}-{part}" for p in ("", "val-") for ev in EVALUATORS for part in ("accuracy", "macro-f1", "recall")
        }
        local_keys = {
            f"{prefix}-{ev}-{_wire(part)}"
            for prefix, evs in (("local", LOCAL_EVALUATORS), ("tuned", TUNED_EVALUATORS))
            for ev in evs
            for part in SCORE_PARTS
        }
        fid_keys = {p + _wire(k) for p in ("", "val-") for k in FIDELITY_KEYS}
        check_keys(m, {"n-test", "n-val", *score_keys, *local_keys, *fid_keys, *(_wire(k) for k in AUDIT_KEYS)}, where)
        fid = {
            k: wire_to_nan(get_value(m, _wire(k), float, where), ABSENT_CORR if k in CORRELATIONS else ABSENT)
            for k in FIDELITY_KEYS
        }
        val_fid = {
            k: wire_to_nan(get_value(m, "val-" + _wire(k), float, where), ABSENT_CORR if k in CORRELATIONS else ABSENT)
            for k in FIDELITY_KEYS
        }
        aud = {k: wire_to_nan(get_value(m, _wire(k), float, where)) for k in AUDIT_KEYS}
        blocks: tuple[tuple[str, tuple[str, ...]], ...] = (("local", LOCAL_EVALUATORS), ("tuned", TUNED_EVALUATORS))
        local, tuned = (
            {
                ev: {
                    part: wire_to_nan(get_value(m, f"{prefix}-{ev}-{_wire(part)}", float, where))
                    for part in SCORE_PARTS
                }
                for ev in evs
            }
            for prefix, evs in blocks
        )
        return cls(
            check_round(get_value(rd[KEY_CONFIG], "round", int, where), where),
            get_value(m, "n-test", int, where),
            _scores_from_wire("", m, where),
            get_value(m, "n-val", int, where),
            _scores_from_wire("val-", m, where),
            fid,
            aud,
            local,
            val_fid,
            tuned,
        )
