"""The federation's wire protocol: message types, record keys and versioned payload schemas.

The only place in ``shared/`` that imports flwr. Every payload is a frozen dataclass with
``to_record() -> RecordDict`` and a strict ``from_record(RecordDict)`` that raises ``ProtocolError``.
"""

from __future__ import annotations

from shared.protocol.codec import (
    EVALUATORS,
    MSG_DISTILL,
    MSG_EVALUATE,
    MSG_PRETRAIN,
    MSG_PROFILE,
    SCHEMA_VERSION,
    Plan,
    SiteSpec,
    Stage,
    StateDict,
    wire_bytes,
)
from shared.protocol.payloads import PretrainReply, PretrainRequest, ProfileReply, ProfileRequest
from shared.protocol.rounds import (
    LOCAL_EVALUATORS,
    TUNED_EVALUATORS,
    DistillReply,
    DistillRequest,
    EvaluateReply,
    EvaluateRequest,
    EvaluatorScores,
)

# The public API: messages, their payloads and the plan. Record keys and encoders stay in
# shared.protocol.codec (what a payload's to_record / from_record use).
__all__ = [
    "EVALUATORS",
    "LOCAL_EVALUATORS",
    "MSG_DISTILL",
    "MSG_EVALUATE",
    "MSG_PRETRAIN",
    "MSG_PROFILE",
    "SCHEMA_VERSION",
    "TUNED_EVALUATORS",
    "DistillReply",
    "DistillRequest",
    "EvaluateReply",
    "EvaluateRequest",
    "EvaluatorScores",
    "Plan",
    "PretrainReply",
    "PretrainRequest",
    "ProfileReply",
    "ProfileRequest",
    "SiteSpec",
    "Stage",
    "StateDict",
    "wire_bytes",
]
