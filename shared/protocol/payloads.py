"""Payloads of query.profile and train.pretrain: frozen dataclasses with strict to_record/from_record."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from shared.protocol.codec import (
    KEY_CLASS_MEANS,
    KEY_CONFIG,
    KEY_CONTROL,
    KEY_ENCODER,
    KEY_LATENT,
    KEY_METRICS,
    KEY_PLAN,
    KEY_PLAN_GENES,
    KEY_SPEC,
    KEY_STATS,
    KEY_WEIGHTS,
    SCHEMA_KEY,
    SPEC_KEYS,
    STAGES,
    Plan,
    SiteSpec,
    Stage,
    StateDict,
    array_record,
    check_keys,
    check_records,
    check_round,
    config_record,
    decode_strings,
    encode_strings,
    fail,
    get_array,
    get_float_list,
    get_str_list,
    get_value,
    state_from_record,
    state_record,
)


# ----------------------------------------------------------------------------- query.profile
@dataclass(frozen=True)
class ProfileRequest:
    """Server -> site: send your per-gene and per-label aggregates (training cells only)."""

    spec: SiteSpec

    def to_record(self) -> RecordDict:
        """Encode."""
        return RecordDict({KEY_SPEC: config_record(self.spec.items())})

    @classmethod
    def from_record(cls, rd: RecordDict) -> ProfileRequest:
        """Decode strictly."""
        where = "profile request"
        check_records(rd, where, configs=[KEY_SPEC])
        check_keys(rd[KEY_SPEC], SPEC_KEYS, where)
        return cls(SiteSpec.parse(rd[KEY_SPEC], where))


@dataclass(frozen=True, eq=False)
class ProfileReply:
    """Site -> server: gene names, per-gene sums / sums of squares / detection counts, cells per label."""

    site_name: str
    genes: tuple[str, ...]
    sums: np.ndarray  # float64 (G,)
    sumsq: np.ndarray  # float64 (G,)
    detected: np.ndarray  # int64 (G,)
    n_cells: int
    label_names: tuple[str, ...]
    label_counts: np.ndarray  # int64 (L,)
    has_counts: bool = False  # the site's input holds raw counts (the VAE's count head can be trained there)

    def to_record(self) -> RecordDict:
        """Encode."""
        stats = ArrayRecord(
            {
                "gene-names": Array(encode_strings(self.genes)),
                "sums": Array(np.asarray(self.sums, np.float64)),
                "sumsq": Array(np.asarray(self.sumsq, np.float64)),
                "detected": Array(np.asarray(self.detected, np.int64)),
                "label-counts": Array(np.asarray(self.label_counts, np.int64)),
            }
        )
        cfg = config_record(
            {
                "site-name": self.site_name,
                "n-cells": int(self.n_cells),
                "label-names": list(self.label_names),
                "has-counts": bool(self.has_counts),
            }
        )
        return RecordDict({KEY_CONFIG: cfg, KEY_STATS: stats})

    @classmethod
    def from_record(cls, rd: RecordDict) -> ProfileReply:
        """Decode strictly."""
        where = "profile reply"
        check_records(rd, where, configs=[KEY_CONFIG], arrays=[KEY_STATS])
        cfg, stats = rd[KEY_CONFIG], array_record(rd, KEY_STATS)
        check_keys(cfg, {SCHEMA_KEY, "site-name", "n-cells", "label-names", "has-counts"}, where)
        check_keys(stats, {"gene-names", "sums", "sumsq", "detected", "label-counts"}, where)
        genes = decode_strings(get_array(stats, "gene-names", "uint8", 1, where), where)
        vecs = [
            get_array(stats, k, dt, 1, where)
            for k, dt in (("sums", "float64"), ("sumsq", "float64"), ("detected", "int64"))
        ]
        if any(v.size != len(genes) for v in vecs):
            raise fail(where, f"per-gene arrays must all have length {len(genes)} (one per gene name)")
        labels = get_str_list(cfg, "label-names", where)
        counts = get_array(stats, "label-counts", "int64", 1, where)
        n_cells = get_value(cfg, "n-cells", int, where)
        name = get_value(cfg, "site-name", str, where)
        if counts.size != len(labels) or len(set(labels)) != len(labels) or n_cells < 1 or not name.strip():
            raise fail(where, "label names/counts inconsistent, duplicated labels, n-cells < 1 or blank site name")
        return cls(
            name, genes, vecs[0], vecs[1], vecs[2], n_cells, labels, counts, get_value(cfg, "has-counts", bool, where)
        )


def _stage_of(rd: RecordDict, where: str) -> tuple[Mapping[str, Any], Stage]:
    """The config record of a pretraining message and its stage, refusing an unknown stage."""
    cfg: Mapping[str, Any] = rd.get(KEY_CONFIG, {})
    stage = cfg.get("stage") if isinstance(cfg, ConfigRecord) else None
    if stage not in STAGES:
        raise fail(where, f"stage {stage!r} unknown; expected one of {STAGES}")
    return cfg, stage  # one of STAGES, checked above


# ----------------------------------------------------------------------------- train.pretrain
@dataclass(frozen=True, eq=False)
class PretrainRequest:
    """Server -> site: run local steps of one pretraining stage on these weights (or report latent moments, or under DP
    release per-class gene means: the "class-means" stage, whose weights are the untrained VAE's)."""

    stage: Stage
    round: int
    weights: StateDict
    model_config: str  # JSON of the model's config dataclass
    plan: Plan
    steps: int
    lr: float
    batch_size: int
    kl_ramp: tuple[
        float, float
    ]  # the VAE's KL weight goes linearly from the first to the second value over this round's steps
    seed: int
    encoder: StateDict | None = None  # the VAE, for the "scdg" stage
    encoder_config: str = ""
    proximal_mu: float = 0.0  # FedProx: the site adds mu/2 * ||w - weights||^2 to its local loss
    keep_optimizer: bool = False  # continue the site's AdamW moments from its previous round of this stage
    balanced_heads: bool = False  # class heads train with the site's class frequencies on their logits
    control: StateDict | None = None  # SCAFFOLD: the server's control variate, one array per trainable parameter

    def to_record(self) -> RecordDict:
        """Encode."""
        cfg = config_record(
            {
                "stage": self.stage,
                "round": self.round,
                "model-config": self.model_config,
                "steps": self.steps,
                "lr": float(self.lr),
                "batch-size": self.batch_size,
                "kl-ramp": [float(v) for v in self.kl_ramp],
                "seed": self.seed,
                "encoder-config": self.encoder_config,
                "proximal-mu": float(self.proximal_mu),
                "keep-optimizer": bool(self.keep_optimizer),
                "balanced-heads": bool(self.balanced_heads),
                "scaffold": self.control is not None,
            }
        )
        rd = RecordDict({KEY_CONFIG: cfg, KEY_WEIGHTS: state_record(self.weights), **self.plan.records()})
        if self.stage == "scdg":
            rd[KEY_ENCODER] = state_record(self.encoder or {})
        if self.control is not None:
            rd[KEY_CONTROL] = state_record(self.control)
        return rd

    @classmethod
    def from_record(cls, rd: RecordDict) -> PretrainRequest:
        """Decode strictly."""
        where = "pretrain request"
        cfg, stage = _stage_of(rd, where)
        scaffold = get_value(cfg, "scaffold", bool, where)
        if scaffold and stage not in ("vae", "scdg"):
            raise fail(where, f"control variates are sent with the vae and scdg stages only, not {stage!r}")
        check_records(
            rd,
            where,
            configs=[KEY_CONFIG, KEY_PLAN],
            arrays=[
                KEY_WEIGHTS,
                KEY_PLAN_GENES,
                *([KEY_ENCODER] if stage == "scdg" else []),
                *([KEY_CONTROL] if scaffold else []),
            ],
        )
        check_keys(
            cfg,
            {
                SCHEMA_KEY,
                "stage",
                "round",
                "model-config",
                "steps",
                "lr",
                "batch-size",
                "kl-ramp",
                "seed",
                "encoder-config",
                "proximal-mu",
                "keep-optimizer",
                "balanced-heads",
                "scaffold",
            },
            where,
        )
        req = cls(
            stage=stage,
            round=check_round(get_value(cfg, "round", int, where), where),
            weights=state_from_record(array_record(rd, KEY_WEIGHTS), where),
            model_config=get_value(cfg, "model-config", str, where),
            plan=Plan.from_records(rd, where),
            steps=get_value(cfg, "steps", int, where),
            lr=get_value(cfg, "lr", float, where),
            batch_size=get_value(cfg, "batch-size", int, where),
            kl_ramp=_ramp(get_float_list(cfg, "kl-ramp", where), where),
            seed=get_value(cfg, "seed", int, where),
            encoder=state_from_record(array_record(rd, KEY_ENCODER), where) if stage == "scdg" else None,
            encoder_config=get_value(cfg, "encoder-config", str, where),
            proximal_mu=get_value(cfg, "proximal-mu", float, where),
            keep_optimizer=get_value(cfg, "keep-optimizer", bool, where),
            balanced_heads=get_value(cfg, "balanced-heads", bool, where),
            control=state_from_record(array_record(rd, KEY_CONTROL), where) if scaffold else None,
        )
        if (
            req.steps < 0
            or req.lr <= 0
            or req.batch_size < 1
            or not all(0 <= v <= 1 for v in req.kl_ramp)
            or not 0 <= req.proximal_mu < 1e6
        ):
            raise fail(
                where, "steps >= 0, lr > 0, batch-size >= 1, KL ramp within [0, 1] and 0 <= proximal-mu < 1e6 required"
            )
        return req


def _ramp(values: tuple[float, ...], where: str) -> tuple[float, float]:
    if len(values) != 2:
        raise fail(where, f"kl-ramp must hold 2 values, got {len(values)}")
    return float(values[0]), float(values[1])


@dataclass(frozen=True, eq=False)
class PretrainReply:
    """Site -> server: updated weights (vae/scdg stages), per-dimension latent sums (latent-stats stage) or, under DP,
    the released per-class gene means and cell counts (class-means stage)."""

    stage: Stage
    round: int
    num_examples: int
    loss: float
    weights: StateDict | None = None
    latent_sum: np.ndarray | None = None  # float64 (d,)
    latent_sumsq: np.ndarray | None = None  # float64 (d,)
    class_means: np.ndarray | None = None  # float32 (C, G): the plan's classes x genes (zero rows: not released)
    class_counts: np.ndarray | None = None  # int64 (C,): the released (noised) training cells per plan class
    control_delta: StateDict | None = None  # SCAFFOLD: the change of the site's control variate this round

    def to_record(self) -> RecordDict:
        """Encode."""
        rd = RecordDict(
            {
                KEY_CONFIG: config_record({"stage": self.stage, "round": self.round}),
                KEY_METRICS: MetricRecord({"num-examples": int(self.num_examples), "loss": float(self.loss)}),
            }
        )
        if self.stage == "latent-stats":
            rd[KEY_LATENT] = ArrayRecord(
                {
                    "sum": Array(np.asarray(self.latent_sum, np.float64)),
                    "sumsq": Array(np.asarray(self.latent_sumsq, np.float64)),
                }
            )
        elif self.stage == "class-means":
            rd[KEY_CLASS_MEANS] = ArrayRecord(
                {
                    "means": Array(np.asarray(self.class_means, np.float32)),
                    "counts": Array(np.asarray(self.class_counts, np.int64)),
                }
            )
        else:
            rd[KEY_WEIGHTS] = state_record(self.weights or {})
            if self.control_delta is not None:
                rd[KEY_CONTROL] = state_record(self.control_delta)
        return rd

    @classmethod
    def from_record(cls, rd: RecordDict) -> PretrainReply:
        """Decode strictly."""
        where = "pretrain reply"
        cfg, stage = _stage_of(rd, where)
        payload = {"latent-stats": KEY_LATENT, "class-means": KEY_CLASS_MEANS}.get(stage, KEY_WEIGHTS)
        control = payload == KEY_WEIGHTS and KEY_CONTROL in rd
        arrays = [payload, *([KEY_CONTROL] if control else [])]
        check_records(rd, where, configs=[KEY_CONFIG], metrics=[KEY_METRICS], arrays=arrays)
        check_keys(cfg, {SCHEMA_KEY, "stage", "round"}, where)
        check_keys(rd[KEY_METRICS], {"num-examples", "loss"}, where)
        out: dict[str, Any] = {}
        if stage == "latent-stats":
            check_keys(rd[KEY_LATENT], {"sum", "sumsq"}, where)
            out = {
                "latent_sum": get_array(array_record(rd, KEY_LATENT), "sum", "float64", 1, where),
                "latent_sumsq": get_array(array_record(rd, KEY_LATENT), "sumsq", "float64", 1, where),
            }
            if out["latent_sum"].shape != out["latent_sumsq"].shape:
                raise fail(where, "latent sum and sumsq differ in length")
        elif stage == "class-means":
            check_keys(rd[KEY_CLASS_MEANS], {"means", "counts"}, where)
            out = {
                "class_means": get_array(array_record(rd, KEY_CLASS_MEANS), "means", "float32", 2, where),
                "class_counts": get_array(array_record(rd, KEY_CLASS_MEANS), "counts", "int64", 1, where),
            }
            if out["class_means"].shape[0] != out["class_counts"].shape[0]:
                raise fail(where, "class means and class counts differ in their number of classes")
        else:
            out = {"weights": state_from_record(array_record(rd, KEY_WEIGHTS), where)}
            if control:
                out["control_delta"] = state_from_record(array_record(rd, KEY_CONTROL), where)
        return cls(
            stage=stage,
            round=check_round(get_value(cfg, "round", int, where), where),
            num_examples=get_value(rd[KEY_METRICS], "num-examples", int, where),
            loss=get_value(rd[KEY_METRICS], "loss", float, where),
            **out,
        )
