"""The evaluation MLP's training rule: epochs with a floor and a cap on steps, one knob for the benchmark and the federation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.config import FederationConfig
from shared import evaluation
from shared.errors import ConfigError
from shared.evaluation import MLPTrainConfig, train_mlp


def test_steps_follow_epochs_within_the_floor_and_the_cap() -> None:
    rule = MLPTrainConfig(epochs=20, min_steps=500, max_steps=5000, batch_size=256)
    assert rule.steps(50) == 500  # a 50-cell synthetic set: the floor, not 2 000 epochs of fixed steps
    assert rule.steps(10_000) == 20 * 40  # 40 minibatches per epoch
    assert rule.steps(1_000_000) == 5000  # a hospital-sized site: capped
    with pytest.raises(ValueError, match="min_steps <= max_steps"):
        MLPTrainConfig(min_steps=10, max_steps=5)


def test_train_mlp_takes_exactly_the_rule_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class Counting(torch.optim.AdamW):
        def step(self, closure=None):  # noqa: ANN001, ANN202
            calls.append(1)
            return super().step(closure)

    monkeypatch.setattr(evaluation.torch.optim, "AdamW", Counting)
    X, y = np.random.default_rng(0).random((600, 12)).astype(np.float32), np.repeat([0, 1, 2], 200)
    train_mlp(X, y, 3, cfg=MLPTrainConfig(epochs=3, min_steps=2, max_steps=100, batch_size=100))
    assert len(calls) == 18  # 3 epochs x 6 minibatches


def test_the_federation_reads_the_same_knob() -> None:
    assert FederationConfig().mlp == MLPTrainConfig()  # 0 = the benchmark's rule, unchanged
    cfg = FederationConfig.from_run_config({"mlp-epochs": 2.5, "mlp-min-steps": 7, "mlp-max-steps": 9})
    assert cfg.mlp == MLPTrainConfig(epochs=2.5, min_steps=7, max_steps=9)
    with pytest.raises(ConfigError, match="mlp-min-steps"):
        FederationConfig.from_run_config({"mlp-min-steps": 50, "mlp-max-steps": 10})
