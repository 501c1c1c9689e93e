"""drift-control=scaffold: a site's own control variate survives in the node state, for the same model only."""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from client.control_state import load_control, save_control

ZEROS = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}


def test_a_kept_variate_comes_back_for_its_model_and_stage_only() -> None:
    state = RecordDict()
    assert load_control(state, "vae", '{"m": 1}', ZEROS) is ZEROS  # nothing kept yet: SCAFFOLD starts at zero
    kept = {"w": np.full((2, 3), 0.25, np.float32), "b": np.array([1.0, -1.0], np.float32)}
    save_control(state, "vae", '{"m": 1}', kept)
    back = load_control(state, "vae", '{"m": 1}', ZEROS)
    assert set(back) == set(kept) and all(np.array_equal(back[k], kept[k]) for k in kept)
    assert load_control(state, "scdg", '{"m": 1}', ZEROS) is ZEROS  # another stage
    assert load_control(state, "vae", '{"m": 2}', ZEROS) is ZEROS  # another model
    other = {"w": np.zeros((3, 3), np.float32), "b": ZEROS["b"]}
    assert load_control(state, "vae", '{"m": 1}', other) is other  # same config, other shapes: not this model's
