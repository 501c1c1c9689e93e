"""A site's AdamW moments kept between its FedAvg rounds (run config ``site-optimizer-state = "keep"``).

They live in the node's ``Context.state``, which Flower keeps on the node for the whole run and never sends
anywhere: one record per pretraining stage, written after round r and read by round r + 1 of the same stage and
model. Anything else (another round, another model, a node restarted in between) starts fresh moments, as
``"reset"`` does every round. Moments are a post-processing of the gradients the site computed (under DP, of the
noised ones), so keeping them costs no privacy budget.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from shared.fitting import AdamCarry

logger = logging.getLogger(__name__)

_PREFIX = "adam-"  # + stage: the moments' arrays (ArrayRecord) and, + "-info", what they belong to (ConfigRecord)


def _key(stage: str) -> tuple[str, str]:
    return f"{_PREFIX}{stage}", f"{_PREFIX}{stage}-info"


def _owner(model_config: str) -> str:
    return hashlib.sha256(model_config.encode()).hexdigest()


def load_carry(state: RecordDict, stage: str, rnd: int, model_config: str) -> AdamCarry:
    """The moments this stage's previous round left for the same model, or a fresh carry."""
    arrays_key, info_key = _key(stage)
    if arrays_key not in state or info_key not in state:
        return AdamCarry()
    info, arrays = state[info_key], state[arrays_key]
    if (
        not isinstance(info, ConfigRecord)
        or not isinstance(arrays, ArrayRecord)
        or info.get("round") != rnd - 1
        or info.get("model") != _owner(model_config)
    ):
        logger.info("stage %s round %d: no AdamW moments of round %d here; starting fresh", stage, rnd, rnd - 1)
        return AdamCarry()
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for name, arr in arrays.items():
        index, field = name.split("/", 1)
        value = torch.from_numpy(arr.numpy().copy())
        # Adam's step count is a 0-d tensor, which an Array stores as shape (1,)
        moments.setdefault(int(index), {})[field] = value.reshape(()) if field == "step" else value
    groups = json.loads(str(info["param-groups"]))
    return AdamCarry({"state": moments, "param_groups": groups})


def save_carry(state: RecordDict, stage: str, rnd: int, model_config: str, carry: AdamCarry) -> None:
    """Keep ``carry`` for this stage's next round (replacing what the stage kept before)."""
    if carry.state is None:
        return
    arrays_key, info_key = _key(stage)
    arrays = ArrayRecord(
        {
            f"{index}/{field}": Array(np.ascontiguousarray(value.detach().cpu().numpy()))
            for index, fields in carry.state["state"].items()
            for field, value in fields.items()
        }
    )
    groups: list[dict[str, Any]] = carry.state["param_groups"]
    state[arrays_key] = arrays
    state[info_key] = ConfigRecord({"round": rnd, "model": _owner(model_config), "param-groups": json.dumps(groups)})


def drop_carries(state: RecordDict, keep: str | None = None) -> None:
    """Forget every stage's moments but ``keep``'s (a stage's moments are of no use once the next stage starts)."""
    for name in [n for n in state if n.startswith(_PREFIX)]:
        if keep is None or name not in _key(keep):
            del state[name]
