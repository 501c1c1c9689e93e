"""The federation's wire protocol: message types, record keys and versioned payload schemas.

The only place in ``shared/`` that imports flwr. Every payload is a frozen dataclass with
``to_record() -> RecordDict`` and a strict ``from_record(RecordDict)`` that raises ``ProtocolError``.
"""

from __future__ import annotations

from shared.protocol.codec import (
    ABSENT,
    ABSENT_CORR,
    EVALUATORS,
    KEY_CODES,
    KEY_CONFIG,
    KEY_DISTILL,
    KEY_ENCODER,
    KEY_LATENT,
    KEY_LOGREG,
    KEY_METRICS,
    KEY_MLP,
    KEY_PLAN,
    KEY_PLAN_GENES,
    KEY_SCDG,
    KEY_SPEC,
    KEY_STATS,
    KEY_SYNTHETIC,
    KEY_VAE,
    KEY_WEIGHTS,
    MESSAGE_TYPES,
    MSG_DISTILL,
    MSG_EVALUATE,
    MSG_PRETRAIN,
    MSG_PROFILE,
    SCHEMA_KEY,
    SCHEMA_VERSION,
    STAGES,
    Plan,
    SiteSpec,
    Stage,
    StateDict,
    decode_strings,
    encode_strings,
    state_from_record,
    state_record,
    wire_bytes,
)
from shared.protocol.payloads import PretrainReply, PretrainRequest, ProfileReply, ProfileRequest
from shared.protocol.rounds import LOCAL_EVALUATORS, DistillReply, DistillRequest, EvaluateReply, EvaluateRequest, EvaluatorScores

__all__ = [
    "ABSENT", "ABSENT_CORR", "EVALUATORS", "KEY_CODES", "KEY_CONFIG", "KEY_DISTILL", "KEY_ENCODER", "KEY_LATENT", "KEY_LOGREG",
    "KEY_METRICS", "KEY_MLP", "KEY_PLAN", "KEY_PLAN_GENES", "KEY_SCDG", "KEY_SPEC", "KEY_STATS", "KEY_SYNTHETIC", "KEY_VAE",
    "KEY_WEIGHTS", "LOCAL_EVALUATORS", "MESSAGE_TYPES", "MSG_DISTILL", "MSG_EVALUATE", "MSG_PRETRAIN", "MSG_PROFILE", "SCHEMA_KEY", "SCHEMA_VERSION",
    "STAGES", "DistillReply", "DistillRequest", "EvaluateReply", "EvaluateRequest", "EvaluatorScores", "Plan", "PretrainReply",
    "PretrainRequest", "ProfileReply", "ProfileRequest", "SiteSpec", "Stage", "StateDict", "decode_strings", "encode_strings",
    "state_from_record", "state_record", "wire_bytes",
]
