"""Malformed site replies are rejected with a named reason (decode + plan-aware validation)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, RecordDict

from server.validation import (
    decode,
    distill_budget,
    validate_distill,
    validate_evaluate,
    validate_pretrain,
    validate_profile,
)
from shared.errors import ProtocolError
from shared.privacy.spec import DPSpec
from shared.protocol import (
    EVALUATORS,
    DistillReply,
    DistillRequest,
    EvaluateReply,
    EvaluatorScores,
    Plan,
    PretrainReply,
    PretrainRequest,
    ProfileReply,
    SiteSpec,
    wire_bytes,
)
from shared.protocol.codec import KEY_CODES, KEY_CONFIG, KEY_LATENT, KEY_METRICS, KEY_STATS, KEY_WEIGHTS, SCHEMA_KEY

PLAN = Plan(("g1", "g2", "g3"), ("B", "T", "mono"))
D = 4  # latent dim
K = 2
STATE = {"w": np.ones((2, 3), np.float32), "b": np.zeros(2, np.float32)}
DREQ = DistillRequest(1, STATE, "{}", STATE, "{}", PLAN, {"k": K}, 0)
SITE_CLASSES = {0, 1}


LIBRARY = np.array([[7.0, 0.5, 0.6], [8.0, 0.3, 0.5], [np.nan, np.nan, np.nan]], np.float32)


def _distill(library: np.ndarray = LIBRARY) -> RecordDict:
    codes = np.arange(16, dtype=np.float32).reshape(4, D) / 16
    return DistillReply(1, codes, np.array([0, 0, 1, 1], np.int32), np.array([5, 5, 0]), 0.5, library).to_record()


def check_distill(rd: RecordDict) -> None:
    reply = decode(rd, DistillReply)
    validate_distill(reply, DREQ, latent_dim=D, site_classes=SITE_CLASSES, wire=wire_bytes(rd))


def _set(record: str, key: str, value: object) -> Callable[[RecordDict], None]:
    return lambda rd: rd[record].__setitem__(key, value)


DISTILL_CASES: dict[str, Callable[[RecordDict], None]] = {
    "codes-float64": _set(KEY_CODES, "codes", Array(np.zeros((4, D), np.float64))),
    "codes-nan": _set(KEY_CODES, "codes", Array(np.full((4, D), np.nan, np.float32))),
    "codes-inf": _set(KEY_CODES, "codes", Array(np.full((4, D), np.inf, np.float32))),
    "codes-1d": _set(KEY_CODES, "codes", Array(np.zeros(4 * D, np.float32))),
    "codes-wrong-latent-dim": _set(KEY_CODES, "codes", Array(np.zeros((4, D + 1), np.float32))),
    "extra-record": lambda rd: rd.__setitem__("cells", ConfigRecord({"barcode": "AAAC-1"})),
    "extra-key": _set(KEY_CODES, "expression", Array(np.zeros((4, 3), np.float32))),
    "missing-key": lambda rd: rd[KEY_CODES].pop("labels"),
    "missing-record": lambda rd: rd.pop(KEY_METRICS),
    "schema-version": _set(
        KEY_CONFIG, SCHEMA_KEY, 1
    ),  # a site of the release before the validation split and the audit
    "empty": lambda rd: [rd.pop(k) for k in list(rd)],
    "label-out-of-range": _set(KEY_CODES, "labels", Array(np.array([0, 0, 1, 7], np.int32))),
    "label-negative": _set(KEY_CODES, "labels", Array(np.array([0, 0, 1, -1], np.int32))),
    "label-unreported-class": _set(KEY_CODES, "labels", Array(np.array([0, 0, 2, 2], np.int32))),
    "labels-int64": _set(KEY_CODES, "labels", Array(np.array([0, 0, 1, 1], np.int64))),
    "labels-length": _set(KEY_CODES, "labels", Array(np.array([0, 1], np.int32))),
    "too-many-per-class": _set(KEY_CODES, "labels", Array(np.array([0, 0, 0, 1], np.int32))),
    "counts-length": _set(KEY_CODES, "class-counts", Array(np.array([5, 5], np.int64))),
    "counts-negative": _set(KEY_CODES, "class-counts", Array(np.array([5, -5, 0], np.int64))),
    "codes-for-empty-class": _set(KEY_CODES, "class-counts", Array(np.array([5, 0, 0], np.int64))),
    "more-codes-than-cells": _set(KEY_CODES, "class-counts", Array(np.array([5, 1, 0], np.int64))),
    "oversized": _set(KEY_CODES, "codes", Array(np.zeros((4, D * 200), np.float32))),
    "wrong-round": _set(KEY_CONFIG, "round", 2),
    "round-is-text": _set(KEY_CONFIG, "round", "1"),
    "negative-seconds": _set(KEY_METRICS, "distill-seconds", -1.0),
    "metric-record-as-config": lambda rd: rd.__setitem__(KEY_METRICS, ConfigRecord({"distill-seconds": 1.0})),
    "library-missing": lambda rd: rd[KEY_CODES].pop("library"),
    "library-float64": _set(KEY_CODES, "library", Array(LIBRARY.astype(np.float64))),
    "library-shape": _set(KEY_CODES, "library", Array(LIBRARY[:2])),
    "library-partial-row": _set(KEY_CODES, "library", Array(np.array([[7.0, np.nan, 0.6], *LIBRARY[1:]], np.float32))),
    "library-for-absent-class": _set(
        KEY_CODES, "library", Array(np.array([*LIBRARY[:2], [7.0, 0.5, 0.5]], np.float32))
    ),
    "library-share-above-1": _set(KEY_CODES, "library", Array(np.array([[7.0, 0.5, 1.5], *LIBRARY[1:]], np.float32))),
    "library-negative-sd": _set(KEY_CODES, "library", Array(np.array([[7.0, -0.5, 0.5], *LIBRARY[1:]], np.float32))),
    "library-huge-total": _set(KEY_CODES, "library", Array(np.array([[70.0, 0.5, 0.5], *LIBRARY[1:]], np.float32))),
}


def test_the_valid_reply_passes() -> None:
    check_distill(_distill())
    check_distill(_distill(np.full((3, 3), np.nan, np.float32)))  # a site without count input
    assert wire_bytes(_distill()) <= distill_budget(K, 3, D)


def test_library_statistics_the_dp_plan_does_not_release_are_refused() -> None:
    """Under DP statistics pretraining no site may send library statistics (its accountant did not count them)."""
    dp = DPSpec(8.0, None, 1.0, "run", class_means=True, library_stats=False)
    req = dataclasses.replace(DREQ, plan=Plan(PLAN.genes, PLAN.classes, SiteSpec(dp=dp)))
    report = {
        "epsilon": 8.0,
        "delta": 1e-4,
        "mechanisms": ["Gaussian: class gene means"],
        "noise_multiplier_sgd": 0.0,
        "noise_multiplier_stats": 1.5,
    }
    codes = np.arange(16, dtype=np.float32).reshape(4, D) / 16

    def check(library: np.ndarray) -> None:
        rd = DistillReply(1, codes, np.array([0, 0, 1, 1], np.int32), np.array([5, 5, 0]), 0.5, library, privacy=report)
        validate_distill(decode(rd.to_record(), DistillReply), req, latent_dim=D, site_classes=SITE_CLASSES, wire=0)

    check(np.full((3, 3), np.nan, np.float32))
    with pytest.raises(ProtocolError, match="library statistics from a site whose DP plan releases none"):
        check(LIBRARY)


@pytest.mark.parametrize("case", sorted(DISTILL_CASES))
def test_malformed_distill_reply_is_rejected(case: str) -> None:
    rd = _distill()
    DISTILL_CASES[case](rd)
    with pytest.raises(ProtocolError):
        check_distill(rd)


def _profile(**over: object) -> ProfileReply:
    base = {
        "site_name": "a",
        "genes": ("g1", "g2"),
        "sums": np.ones(2),
        "sumsq": np.ones(2),
        "detected": np.array([1, 2]),
        "n_cells": 4,
        "label_names": ("B",),
        "label_counts": np.array([4]),
    }
    return ProfileReply(**{**base, **over})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("over", "seen"),
    [
        ({}, {"a"}),
        ({"sums": np.array([-1.0, 1.0])}, set()),
        ({"detected": np.array([1, 9])}, set()),
        ({"label_counts": np.array([9])}, set()),
        ({"label_counts": np.array([0])}, set()),
    ],
    ids=["duplicated-site", "negative-sums", "detected-over-n", "labels-over-n", "zero-label-count"],
)
def test_malformed_profile_is_rejected(over: dict, seen: set) -> None:
    with pytest.raises(ProtocolError):
        validate_profile(decode(_profile(**over).to_record(), ProfileReply), seen_sites=seen)


def test_profile_with_duplicate_gene_names_fails_decoding() -> None:
    rd = _profile().to_record()
    rd[KEY_STATS]["gene-names"] = Array(np.frombuffer(b"g1\ng1", np.uint8).copy())
    with pytest.raises(ProtocolError, match="unique"):
        decode(rd, ProfileReply)


PREQ = PretrainRequest("vae", 1, STATE, "{}", PLAN, 5, 1e-3, 8, (1.0, 1.0), 0)


@pytest.mark.parametrize(
    "mutate",
    [
        _set(KEY_WEIGHTS, "w", Array(np.ones((3, 3), np.float32))),
        lambda rd: rd[KEY_WEIGHTS].pop("b"),
        _set(KEY_WEIGHTS, "extra", Array(np.ones(1, np.float32))),
        _set(KEY_WEIGHTS, "w", Array(np.ones((2, 3), np.float64))),
        _set(KEY_METRICS, "num-examples", 0),
        _set(KEY_CONFIG, "stage", "scdg"),
        _set(KEY_CONFIG, "stage", "hack"),
    ],
    ids=[
        "weight-shape",
        "weight-missing",
        "weight-extra",
        "weight-dtype",
        "zero-examples",
        "wrong-stage",
        "unknown-stage",
    ],
)
def test_malformed_pretrain_reply_is_rejected(mutate: Callable[[RecordDict], None]) -> None:
    rd = PretrainReply("vae", 1, 10, 0.5, weights=STATE).to_record()
    mutate(rd)
    with pytest.raises(ProtocolError):
        validate_pretrain(decode(rd, PretrainReply), PREQ, latent_dim=D)


def test_latent_stats_of_the_wrong_length_are_rejected() -> None:
    req = PretrainRequest("latent-stats", 0, STATE, "{}", PLAN, 0, 1e-3, 8, (1.0, 1.0), 0)
    rd = PretrainReply("latent-stats", 0, 10, 0.0, latent_sum=np.ones(D + 1), latent_sumsq=np.ones(D + 1)).to_record()
    with pytest.raises(ProtocolError, match="latent"):
        validate_pretrain(decode(rd, PretrainReply), req, latent_dim=D)
    rd[KEY_LATENT]["sumsq"] = Array(np.ones(2))
    with pytest.raises(ProtocolError):
        decode(rd, PretrainReply)


def test_class_means_must_fit_the_plan() -> None:
    req = PretrainRequest("class-means", 0, STATE, "{}", PLAN, 0, 1e-3, 1, (1.0, 1.0), 0)
    means, counts = np.ones((3, 3), np.float32), np.array([10, 7, 0])
    means[2] = 0.0

    def reply(m: np.ndarray, n: np.ndarray) -> PretrainReply:
        rd = PretrainReply("class-means", 0, 17, 0.0, class_means=m, class_counts=n).to_record()
        return decode(rd, PretrainReply)

    validate_pretrain(reply(means, counts), req, latent_dim=D)
    raw = means.copy()
    raw[0, 1] = -0.3  # raw released means: noise can make one negative (the coordinator denoises them)
    validate_pretrain(reply(raw, counts), req, latent_dim=D)
    for m, n, what in (
        (means[:, :2], counts, "matrix"),
        (means * 1e7, counts, "within"),
        (means, -counts, "non-negative"),
        (means + 1, counts, "zero row"),  # a class released with 0 cells
        (means, counts * 0, "at least one class"),
    ):
        with pytest.raises(ProtocolError, match=what):
            validate_pretrain(reply(np.ascontiguousarray(m), n), req, latent_dim=D)
    with pytest.raises(ProtocolError, match="differ"):
        reply(means, counts[:2])
    rd = PretrainReply("class-means", 0, 17, 0.0, class_means=means * np.nan, class_counts=counts).to_record()
    with pytest.raises(ProtocolError):
        decode(rd, PretrainReply)


FIDELITY = {
    "mmd_pca": 0.1,
    "mean_corr": 0.9,
    "var_corr": 0.5,
    "marker_overlap": 0.4,
    "zero_fraction_real": 0.9,
    "zero_fraction_synthetic": 0.1,
}
AUDIT = {"seed_mia": 0.6, "population_mia": 0.5, "density_mia": 0.55, "dcr_share": 0.5}
AUDIT |= {"seed_mia_null95": 0.6, "population_mia_null95": 0.55, "density_mia_null95": 0.6}


def _evaluate(
    acc: float = 0.9,
    recall: tuple = (1.0, 0.5, float("nan")),
    n_test: int = 10,
    val_acc: float = 0.85,
    n_val: int = 5,
    audit: dict | None = None,
    fidelity: dict | None = None,
    local_acc: float = 0.88,
    val_fidelity: dict | None = None,
    tuned_acc: float = 0.9,
) -> EvaluateReply:
    scores = {ev: EvaluatorScores(acc, 0.8, recall) for ev in EVALUATORS}
    val = {ev: EvaluatorScores(val_acc, 0.7, recall) for ev in EVALUATORS}
    local = {"mlp": {"accuracy": local_acc, "macro_f1": 0.8}, "logreg": {"accuracy": 0.9, "macro_f1": 0.8}}
    return EvaluateReply(
        1,
        n_test,
        scores,
        n_val,
        val,
        {**FIDELITY, **(fidelity or {})},
        {**AUDIT, **(audit or {})},
        local,
        {**FIDELITY, **(val_fidelity or {})},
        {"mlp": {"accuracy": tuned_acc, "macro_f1": 0.8}},
    )


@pytest.mark.parametrize(
    "reply",
    [
        _evaluate(acc=1.5),
        _evaluate(recall=(1.0,)),
        _evaluate(n_test=0),
        _evaluate(recall=(1.0, 2.0, 0.0)),
        _evaluate(val_acc=1.2),
        _evaluate(val_acc=float("nan")),
        _evaluate(acc=float("nan")),
        _evaluate(n_val=-1),
        _evaluate(audit={"seed_mia": 1.5}),
        _evaluate(audit={"dcr_share": -0.1}),
        _evaluate(audit={"seed_mia_null95": 1.5}),
        _evaluate(audit={"density_mia_null95": -0.2}),
        _evaluate(fidelity={"marker_overlap": 2.0}),
        _evaluate(fidelity={"var_corr": -3.0}),
        _evaluate(local_acc=1.3),
        _evaluate(tuned_acc=-0.2),
        _evaluate(val_fidelity={"zero_fraction_synthetic": 1.5}),
        _evaluate(val_fidelity={"mmd_pca": -0.5}),
    ],
    ids=[
        "accuracy-over-1",
        "recall-length",
        "no-test-cells",
        "recall-over-1",
        "val-accuracy-over-1",
        "val-accuracy-missing-with-val-cells",
        "test-accuracy-missing",
        "negative-val-cells",
        "seed-mia-over-1",
        "dcr-share-negative",
        "chance-bound-over-1",
        "chance-bound-negative",
        "marker-overlap-over-1",
        "var-corr-below-minus-1",
        "local-only-over-1",
        "fine-tuned-negative",
        "val-zero-fraction-over-1",
        "val-mmd-negative",
    ],
)
def test_malformed_evaluate_reply_is_rejected(reply: EvaluateReply) -> None:
    validate_evaluate(_evaluate(), round_=1, n_classes=3)
    with pytest.raises(ProtocolError):
        validate_evaluate(decode(reply.to_record(), EvaluateReply), round_=1, n_classes=3)


def test_evaluate_reply_without_validation_cells_may_leave_validation_and_audit_absent() -> None:
    nan = float("nan")
    reply = _evaluate(n_val=0, val_acc=nan, audit={"seed_mia": nan, "density_mia": nan})
    back = decode(reply.to_record(), EvaluateReply)
    validate_evaluate(back, round_=1, n_classes=3)
    assert (
        math.isnan(back.val_scores["mlp"].accuracy)
        and math.isnan(back.audit["seed_mia"])
        and back.audit["dcr_share"] == 0.5
    )


def test_evaluate_reply_with_nan_accuracy_fails_decoding() -> None:
    rd = _evaluate().to_record()
    rd[KEY_METRICS]["mlp-accuracy"] = float("nan")
    with pytest.raises(ProtocolError, match="finite"):
        decode(rd, EvaluateReply)


@pytest.mark.parametrize(
    "vector", [np.full(8, np.nan, np.float32), np.zeros(7, np.float32), np.zeros(8, np.float64), None]
)
def test_a_site_vector_that_is_not_finite_or_of_the_wrong_shape_is_rejected(vector: np.ndarray | None) -> None:
    from server.synthesis import fresh_models
    from shared.checkpoint import state_of

    vae, _ = fresh_models(PLAN, latent_dim=D, seed=0, site_dim=8)
    sent = state_of(vae)
    req = PretrainRequest("vae", 1, sent, "{}", PLAN, 1, 1e-3, 8, (1.0, 1.0), 0)
    validate_pretrain(
        decode(PretrainReply("vae", 1, 10, 0.5, weights=sent).to_record(), PretrainReply), req, latent_dim=D
    )
    weights = dict(sent)  # the same keys in the same order: only the site vector differs
    if vector is None:
        del weights["site_embedding"]
    else:
        weights["site_embedding"] = vector
    with pytest.raises(ProtocolError):
        validate_pretrain(
            decode(PretrainReply("vae", 1, 10, 0.5, weights=weights).to_record(), PretrainReply), req, latent_dim=D
        )


def test_control_variates_must_come_back_exactly_when_sent_and_fit_the_sent_ones() -> None:
    control = {k: np.zeros_like(v) for k, v in STATE.items()}
    req = dataclasses.replace(PREQ, control=control)

    def reply(delta: dict[str, np.ndarray] | None) -> PretrainReply:
        return decode(PretrainReply("vae", 1, 10, 0.5, weights=STATE, control_delta=delta).to_record(), PretrainReply)

    validate_pretrain(reply({k: v + 0.1 for k, v in control.items()}), req, latent_dim=D)
    with pytest.raises(ProtocolError, match="requested but none came back"):
        validate_pretrain(reply(None), req, latent_dim=D)
    with pytest.raises(ProtocolError, match="not requested"):
        validate_pretrain(reply(control), PREQ, latent_dim=D)
    with pytest.raises(ProtocolError, match="control-variate weights"):
        validate_pretrain(reply({"w": control["w"]}), req, latent_dim=D)
    with pytest.raises(ProtocolError, match="control-variate weights"):
        validate_pretrain(reply({"w": np.zeros((3, 2), np.float32), "b": control["b"]}), req, latent_dim=D)


MEANS = np.array([[0.5, 1.0, 0.0], [2.0, 0.1, 0.3], [np.nan] * 3], np.float32)  # classes B, T (5 cells each); no mono


def _with_means(means: np.ndarray | None, counts: tuple[int, ...] = (5, 5, 0)) -> DistillReply:
    codes = np.arange(16, dtype=np.float32).reshape(4, D) / 16
    return DistillReply(1, codes, np.array([0, 0, 1, 1], np.int32), np.array(counts), 0.5, LIBRARY, class_means=means)


def test_class_means_pass_only_when_asked_for_and_only_for_classes_of_enough_cells() -> None:
    """recenter: a site's class means come back decoded intact; they are refused unasked, missing when asked, for a
    class under shared.counts.MIN_CELLS (5) cells, as partial rows, outside the log-normalised range or misshaped."""
    asked = dataclasses.replace(DREQ, send_class_means=True)

    def check(reply: DistillReply, req: DistillRequest = asked) -> None:
        rd = reply.to_record()
        back = decode(rd, DistillReply)
        validate_distill(back, req, latent_dim=D, site_classes=SITE_CLASSES, wire=wire_bytes(rd))

    back = decode(_with_means(MEANS).to_record(), DistillReply)
    assert back.class_means is not None and np.array_equal(back.class_means, MEANS, equal_nan=True)
    check(_with_means(MEANS))
    check(_with_means(np.full((3, 3), np.nan, np.float32)))  # every class too small: nothing to shift
    assert wire_bytes(_with_means(MEANS).to_record()) <= distill_budget(K, 3, D, n_genes=3)
    bad = {
        "the request did not ask": (_with_means(MEANS), DREQ),
        "asked for class means": (_with_means(None), asked),
        "at least 5 training cells": (_with_means(MEANS, counts=(5, 4, 0)), asked),
        "complete rows": (_with_means(np.array([[0.5, np.nan, 0.0], *MEANS[1:]], np.float32)), asked),
        "log-normalised range": (_with_means(np.array([[0.5, 12.0, 0.0], *MEANS[1:]], np.float32)), asked),
        "negative": (_with_means(np.array([[-0.5, 1.0, 0.0], *MEANS[1:]], np.float32)), asked),
        "expected (3, 3)": (_with_means(MEANS[:, :2]), asked),
    }
    for reason, (reply, req) in bad.items():
        with pytest.raises(ProtocolError, match=re.escape(reason if reason != "negative" else "log-normalised range")):
            check(reply, req)
    request = decode(asked.to_record(), DistillRequest)
    assert request.send_class_means and not decode(DREQ.to_record(), DistillRequest).send_class_means
