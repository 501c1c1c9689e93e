"""A site's own SCAFFOLD control variate (``c_i``, ``shared.drift``) kept between its FedAvg rounds.

It lives in the node's ``Context.state``, which Flower keeps on the node for the whole run and never sends anywhere:
one record per pretraining stage and model. Only its change of each round leaves the site (the reply's
``control_delta``), which the server averages into its own variate. A variate made for another model (another
config), or none at all (round 1, a restarted node), starts from zeros, as SCAFFOLD's first round does.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

logger = logging.getLogger(__name__)

_PREFIX = "scaffold-"  # + stage: the variate (ArrayRecord) and, + "-info", the model it belongs to (ConfigRecord)


def _keys(stage: str) -> tuple[str, str]:
    return f"{_PREFIX}{stage}", f"{_PREFIX}{stage}-info"


def _owner(model_config: str) -> str:
    return hashlib.sha256(model_config.encode()).hexdigest()


def load_control(
    state: RecordDict, stage: str, model_config: str, zeros: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """This stage's control variate for this model, or ``zeros`` when the site holds none that fits."""
    arrays_key, info_key = _keys(stage)
    arrays, info = state.get(arrays_key), state.get(info_key)
    if (
        not isinstance(arrays, ArrayRecord)
        or not isinstance(info, ConfigRecord)
        or info.get("model") != _owner(model_config)
    ):
        return zeros
    kept = {name: arr.numpy() for name, arr in arrays.items()}
    if set(kept) != set(zeros) or any(kept[n].shape != zeros[n].shape for n in zeros):
        logger.info("stage %s: the kept control variate does not fit this model; starting from zeros", stage)
        return zeros
    return kept


def save_control(state: RecordDict, stage: str, model_config: str, control: dict[str, np.ndarray]) -> None:
    """Keep ``control`` as this stage's variate (replacing the previous one)."""
    arrays_key, info_key = _keys(stage)
    state[arrays_key] = ArrayRecord({n: Array(np.ascontiguousarray(v, dtype=np.float32)) for n, v in control.items()})
    state[info_key] = ConfigRecord({"model": _owner(model_config)})
