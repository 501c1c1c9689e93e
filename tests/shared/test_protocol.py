"""Every payload of shared.protocol survives to_record -> from_record, and decoding is strict (each name is
imported from the module that defines it: codec, payloads, rounds)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, MetricRecord, RecordDict

from shared.errors import ProtocolError
from shared.protocol.codec import (
    EVALUATORS,
    KEY_CODES,
    KEY_CONFIG,
    KEY_CONTROL,
    KEY_METRICS,
    KEY_STATS,
    MESSAGE_TYPES,
    SCHEMA_KEY,
    SCHEMA_VERSION,
    Plan,
    SiteSpec,
    decode_strings,
    encode_strings,
    state_record,
    wire_bytes,
)
from shared.protocol.payloads import PretrainReply, PretrainRequest, ProfileReply, ProfileRequest
from shared.protocol.rounds import DistillReply, DistillRequest, EvaluateReply, EvaluateRequest, EvaluatorScores

RNG = np.random.default_rng(0)
PLAN = Plan(
    genes=("CD3E", "MS4A1", "LYZ", "NKG7"),
    classes=("B", "T", "mono"),
    spec=SiteSpec(label_key="cell_type", split_seed=3),
)
STATE = {"layer.weight": RNG.normal(size=(3, 4)).astype(np.float32), "layer.bias": np.zeros(3, np.float32)}


def _arrays_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_message_types_follow_flower_routing() -> None:
    assert MESSAGE_TYPES == ("query.profile", "train.pretrain", "train.distill", "evaluate.models")


def test_profile_request_roundtrip() -> None:
    req = ProfileRequest(PLAN.spec)
    assert ProfileRequest.from_record(req.to_record()) == req


def test_profile_reply_roundtrip() -> None:
    reply = ProfileReply(
        "hospital-a",
        PLAN.genes,
        np.arange(4.0),
        np.arange(4.0) ** 2,
        np.array([0, 1, 2, 3]),
        7,
        ("B", "T"),
        np.array([3, 4]),
    )
    back = ProfileReply.from_record(reply.to_record())
    assert (back.site_name, back.genes, back.n_cells, back.label_names) == (reply.site_name, reply.genes, 7, ("B", "T"))
    for name in ("sums", "sumsq", "detected", "label_counts"):
        assert np.array_equal(getattr(back, name), getattr(reply, name))
    assert back.sums.dtype == np.float64 and back.detected.dtype == np.int64
    assert back.has_counts is False
    assert ProfileReply.from_record(
        ProfileReply(
            *(
                getattr(reply, f)
                for f in ("site_name", "genes", "sums", "sumsq", "detected", "n_cells", "label_names", "label_counts")
            ),
            has_counts=True,
        ).to_record()
    ).has_counts


@pytest.mark.parametrize("stage", ["vae", "latent-stats", "scdg"])
def test_pretrain_request_roundtrip(stage: str) -> None:
    enc = STATE if stage == "scdg" else None
    req = PretrainRequest(
        stage,
        2,
        STATE,
        '{"a": 1}',
        PLAN,
        10,
        1e-3,
        64,
        (0.25, 0.5),
        5,
        encoder=enc,
        proximal_mu=0.01,
        encoder_config='{"b": 2}' if enc else "",
    )
    back = PretrainRequest.from_record(req.to_record())
    assert (back.stage, back.round, back.steps, back.lr, back.batch_size, back.kl_ramp, back.seed) == (
        stage,
        2,
        10,
        1e-3,
        64,
        (0.25, 0.5),
        5,
    )
    assert back.plan == PLAN and _arrays_equal(back.weights, STATE) and back.proximal_mu == 0.01
    assert (back.encoder is None) == (stage != "scdg")


@pytest.mark.parametrize("stage", ["vae", "scdg", "latent-stats", "class-means"])
def test_pretrain_reply_roundtrip(stage: str) -> None:
    if stage == "latent-stats":
        reply = PretrainReply(stage, 0, 11, 0.0, latent_sum=np.ones(8), latent_sumsq=np.full(8, 2.0))
    elif stage == "class-means":
        means = np.arange(6, dtype=np.float32).reshape(2, 3)
        reply = PretrainReply(stage, 0, 11, 0.0, class_means=means, class_counts=np.array([5, 6]))
    else:
        reply = PretrainReply(stage, 3, 11, 0.25, weights=STATE)
    back = PretrainReply.from_record(reply.to_record())
    assert (back.stage, back.round, back.num_examples, back.loss) == (stage, reply.round, 11, reply.loss)
    if stage == "latent-stats":
        assert np.array_equal(back.latent_sumsq, reply.latent_sumsq)
    elif stage == "class-means":
        assert np.array_equal(back.class_means, reply.class_means) and back.class_counts.tolist() == [5, 6]
    else:
        assert _arrays_equal(back.weights, STATE)


def test_distill_request_roundtrip() -> None:
    req = DistillRequest(
        1, STATE, "{}", STATE, "{}", PLAN, {"k": 10, "iterations": 60, "lr": 0.05, "init": "real"}, 42, warm_start=False
    )
    back = DistillRequest.from_record(req.to_record())
    assert dict(back.distill) == dict(req.distill) and back.k == 10 and back.seed == 42 and back.warm_start is False
    assert back.plan == PLAN and _arrays_equal(back.scdg, STATE)


def test_the_plans_dp_center_travels_joins_its_digest_and_is_checked() -> None:
    centered = dataclasses.replace(PLAN, center=(0.5, 1.0, 2.0, 0.0))
    back = DistillRequest.from_record(DistillRequest(1, STATE, "{}", STATE, "{}", centered, {"k": 2}, 1).to_record())
    assert back.plan == centered and Plan.from_json(json.loads(json.dumps(centered.to_json()))) == centered
    assert centered.digest() != PLAN.digest() and "center" not in PLAN.to_json()
    for bad, why in (((0.5, 1.0), "4 finite non-negative"), ((0.5, -1.0, 2.0, 0.0), "4 finite non-negative")):
        rec = DistillRequest(1, STATE, "{}", STATE, "{}", dataclasses.replace(PLAN, center=bad), {"k": 2}, 1)
        with pytest.raises(ProtocolError, match=why):
            DistillRequest.from_record(rec.to_record())


def test_distill_request_carries_the_sites_previous_codes_back_and_checks_them() -> None:
    codes, labels = RNG.normal(size=(6, 8)).astype(np.float32), np.array([0, 0, 1, 1, 2, 2], np.int32)
    req = DistillRequest(2, STATE, "{}", STATE, "{}", PLAN, {"k": 2}, 1, warm_codes=codes, warm_labels=labels)
    back = DistillRequest.from_record(req.to_record())
    assert (
        back.warm_codes is not None
        and np.array_equal(back.warm_codes, codes)
        and np.array_equal(back.warm_labels, labels)
    )
    assert (
        DistillRequest.from_record(
            DistillRequest(1, STATE, "{}", STATE, "{}", PLAN, {"k": 2}, 1).to_record()
        ).warm_codes
        is None
    )
    bad = DistillRequest(2, STATE, "{}", STATE, "{}", PLAN, {"k": 2}, 1, warm_codes=codes, warm_labels=labels[:5])
    with pytest.raises(ProtocolError, match="warm start has 6 codes but 5 labels"):
        DistillRequest.from_record(bad.to_record())


def test_distill_request_carries_the_coordinators_class_means_and_checks_them() -> None:
    shape = (len(PLAN.classes), len(PLAN.genes))
    means = RNG.gamma(1.0, 1.0, shape).astype(np.float32)
    back = DistillRequest.from_record(
        DistillRequest(1, STATE, "{}", STATE, "{}", PLAN, {"k": 2}, 1, class_means=means).to_record()
    )
    assert back.class_means is not None and np.array_equal(back.class_means, means)
    for bad, why in ((means[:, :2], "finite, non-negative"), (-means, "finite, non-negative"), (means * np.nan, "NaN")):
        req = DistillRequest(1, STATE, "{}", STATE, "{}", PLAN, {"k": 2}, 1, class_means=np.ascontiguousarray(bad))
        with pytest.raises(ProtocolError, match=why):
            DistillRequest.from_record(req.to_record())


def test_distill_reply_roundtrip_and_size() -> None:
    library = np.array(
        [[7.5, 0.4, 0.6], [np.nan, np.nan, np.nan], [8.0, 0.2, 0.7]], np.float32
    )  # NaN: "absent" travels as such
    reply = DistillReply(
        2,
        RNG.normal(size=(6, 8)).astype(np.float32),
        np.array([0, 0, 1, 1, 2, 2], np.int32),
        np.array([5, 7, 2]),
        1.5,
        library,
    )
    back = DistillReply.from_record(reply.to_record())
    assert np.array_equal(back.codes, reply.codes) and back.labels.dtype == np.int32 and back.distill_seconds == 1.5
    assert np.array_equal(back.library, library, equal_nan=True)
    assert 6 * 8 * 4 < wire_bytes(reply.to_record()) < 6 * 8 * 4 + 4096
    with pytest.raises(ProtocolError, match="Inf"):
        DistillReply.from_record(
            DistillReply(2, reply.codes, reply.labels, reply.class_counts, 1.5, library * np.inf).to_record()
        )
    with pytest.raises(ProtocolError, match="shape"):
        DistillReply.from_record(
            DistillReply(2, reply.codes, reply.labels, reply.class_counts, 1.5, library[:, :2]).to_record()
        )


def test_evaluate_request_roundtrip() -> None:
    req = EvaluateRequest(
        1,
        RNG.random((5, 4)).astype(np.float32),
        np.array([0, 1, 2, 0, 1], np.int32),
        STATE,
        "{}",
        RNG.normal(size=(3, 4)),
        np.zeros(3),
        np.array([0, 1, 2]),
        PLAN,
        9,
        20.0,
        150,
        5000,
    )
    back = EvaluateRequest.from_record(req.to_record())
    assert (
        np.array_equal(back.X, req.X)
        and np.array_equal(back.logreg_coef, req.logreg_coef)
        and back.plan == PLAN
        and back.seed == 9
        and (back.mlp_epochs, back.mlp_min_steps, back.mlp_max_steps) == (20.0, 150, 5000)
    )
    bad = req.to_record()
    bad[KEY_CONFIG]["mlp-min-steps"] = 6000  # above the max: no rule the site could follow
    with pytest.raises(ProtocolError, match="mlp-min-steps"):
        EvaluateRequest.from_record(bad)


def test_evaluate_reply_roundtrip_keeps_nan_as_absent() -> None:
    nan = float("nan")
    scores = {ev: EvaluatorScores(0.9, 0.8, (1.0, nan, 0.5)) for ev in EVALUATORS}
    val = {ev: EvaluatorScores(nan, nan, (nan, nan, nan)) for ev in EVALUATORS}
    fid = {
        "mmd_pca": nan,
        "mean_corr": nan,
        "var_corr": 0.3,
        "marker_overlap": 0.42,
        "zero_fraction_real": 0.9,
        "zero_fraction_synthetic": 0.1,
    }
    aud = {"seed_mia": 0.65, "population_mia": 0.55, "density_mia": nan, "dcr_share": 0.6}
    aud |= {"seed_mia_null95": 0.6, "population_mia_null95": 0.53, "density_mia_null95": nan}
    local = {"mlp": {"accuracy": 0.91, "macro_f1": 0.85}, "logreg": {"accuracy": 0.93, "macro_f1": nan}}
    tuned = {"mlp": {"accuracy": 0.95, "macro_f1": nan}}
    reply = EvaluateReply(2, 40, scores, 0, val, fid, aud, local, {**fid, "marker_overlap": 0.61}, tuned)
    rd = reply.to_record()
    m = rd[KEY_METRICS]
    assert (
        m["mlp-recall"] == [1.0, -1.0, 0.5]
        and m["mean-corr"] == -2.0
        and m["density-mia"] == -1.0
        and m["val-mlp-accuracy"] == -1.0
    )
    back = EvaluateReply.from_record(rd)
    assert (
        math.isnan(back.scores["knn"].recall[1])
        and math.isnan(back.fidelity["mean_corr"])
        and back.fidelity["marker_overlap"] == 0.42
    )
    assert back.val_fidelity["marker_overlap"] == 0.61 and math.isnan(back.val_fidelity["mmd_pca"])
    assert (
        back.audit["seed_mia"] == 0.65
        and back.audit["population_mia"] == 0.55
        and math.isnan(back.audit["density_mia"])
    )
    assert back.n_val == 0 and math.isnan(back.val_scores["mlp"].accuracy)
    assert back.local_only["mlp"] == {"accuracy": 0.91, "macro_f1": 0.85} and math.isnan(
        back.local_only["logreg"]["macro_f1"]
    )
    assert m["local-logreg-accuracy"] == 0.93
    assert back.fine_tuned["mlp"]["accuracy"] == 0.95 and math.isnan(back.fine_tuned["mlp"]["macro_f1"])
    assert m["tuned-mlp-accuracy"] == 0.95 and m["tuned-mlp-macro-f1"] == -1.0


def test_every_config_record_carries_the_schema_version() -> None:
    payloads = [
        ProfileRequest(PLAN.spec),
        DistillReply(
            0,
            np.zeros((1, 2), np.float32),
            np.zeros(1, np.int32),
            np.ones(3, np.int64),
            0.0,
            np.full((3, 3), np.nan, np.float32),
        ),
    ]
    for p in payloads:
        for rec in p.to_record().config_records.values():
            assert rec[SCHEMA_KEY] == SCHEMA_VERSION


def test_strings_roundtrip_and_refuse_bad_names() -> None:
    names = ("ß-gene", "IGHV3-23", "a b")
    assert decode_strings(encode_strings(names), "t") == names
    with pytest.raises(ProtocolError):
        encode_strings(["bad\nname"])
    with pytest.raises(ProtocolError, match="unique"):
        decode_strings(encode_strings(["x", "x"]), "t")


def _distill_rd() -> RecordDict:
    return DistillReply(
        1,
        np.ones((2, 4), np.float32),
        np.array([0, 1], np.int32),
        np.array([3, 3]),
        0.1,
        np.full((2, 3), np.nan, np.float32),
    ).to_record()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda rd: rd[KEY_CONFIG].__setitem__(SCHEMA_KEY, 99), "schema version"),
        (lambda rd: rd.__setitem__("extra", ConfigRecord({"x": 1})), "unexpected"),
        (lambda rd: rd.pop(KEY_METRICS), "missing"),
        (lambda rd: rd[KEY_CODES].__setitem__("codes", Array(np.ones((2, 4), np.float64))), "dtype"),
        (lambda rd: rd[KEY_CODES].__setitem__("codes", Array(np.full((2, 4), np.nan, np.float32))), "NaN"),
        (lambda rd: rd[KEY_CODES].__setitem__("codes", Array(np.ones(8, np.float32))), "dimensions"),
        (lambda rd: rd[KEY_CODES].__setitem__("labels", Array(np.array([0], np.int32))), "label"),
        (lambda rd: rd[KEY_METRICS].__setitem__("distill-seconds", float("inf")), "finite"),
        (lambda rd: rd[KEY_CONFIG].__setitem__("round", "one"), "expected int"),
        (lambda rd: rd.__setitem__(KEY_CODES, MetricRecord({"codes": 1.0})), "expected ArrayRecord"),
        (lambda rd: rd[KEY_CODES].__setitem__("cell-ids", Array(np.zeros(2, np.int64))), "unexpected"),
    ],
)
def test_distill_reply_decoding_is_strict(mutate, reason: str) -> None:
    rd = _distill_rd()
    mutate(rd)
    with pytest.raises(ProtocolError, match=reason):
        DistillReply.from_record(rd)


def test_profile_reply_refuses_inconsistent_lengths() -> None:
    rd = ProfileReply(
        "a", ("g1", "g2"), np.ones(2), np.ones(2), np.ones(2, np.int64), 3, ("B",), np.array([3])
    ).to_record()
    rd[KEY_STATS]["sums"] = Array(np.ones(3))
    with pytest.raises(ProtocolError, match="length"):
        ProfileReply.from_record(rd)


def test_empty_content_is_refused_by_every_decoder() -> None:
    for payload in (
        ProfileRequest,
        ProfileReply,
        PretrainRequest,
        PretrainReply,
        DistillRequest,
        DistillReply,
        EvaluateRequest,
        EvaluateReply,
    ):
        with pytest.raises(ProtocolError):
            payload.from_record(RecordDict())


def test_scaffold_control_variates_travel_with_training_stages_only() -> None:
    control = {k: np.full_like(v, 0.5) for k, v in STATE.items()}
    req = PretrainRequest("vae", 2, STATE, "{}", PLAN, 10, 1e-3, 64, (0.0, 1.0), 5, control=control)
    back = PretrainRequest.from_record(req.to_record())
    assert back.control is not None and _arrays_equal(back.control, control)
    assert PretrainRequest.from_record(dataclasses.replace(req, control=None).to_record()).control is None
    rd = dataclasses.replace(req, stage="latent-stats").to_record()
    with pytest.raises(ProtocolError, match="control variates"):
        PretrainRequest.from_record(rd)

    reply = PretrainReply("vae", 2, 11, 0.25, weights=STATE, control_delta=control)
    got = PretrainReply.from_record(reply.to_record())
    assert got.control_delta is not None and _arrays_equal(got.control_delta, control)
    assert PretrainReply.from_record(dataclasses.replace(reply, control_delta=None).to_record()).control_delta is None
    bad = reply.to_record()
    bad[KEY_CONTROL] = state_record({k: v * np.nan for k, v in control.items()})
    with pytest.raises(ProtocolError):
        PretrainReply.from_record(bad)
