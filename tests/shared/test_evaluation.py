"""The evaluation MLP's training rule: epochs with a floor and a cap on steps, one knob for the benchmark and the
federation."""

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
        def step(self, closure=None):
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


def _kang_split(example_path):
    from shared.data import prepare_site, read_h5ad

    site = prepare_site(read_h5ad(example_path), label_key="cell_type")
    return site.X[site.train_idx], site.labels[site.train_idx], site.X[site.test_idx], site.labels[site.test_idx]


def test_a_hospital_sized_site_is_scored_a_block_at_a_time_with_the_same_predictions(
    example_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    X, y, X_test, y_test = _kang_split(example_path)
    whole = {ev: evaluation.fit_predict(ev, X, y, X_test, 5) for ev in ("logreg", "knn")}
    monkeypatch.setattr(evaluation, "PREDICT_ROWS", 7)
    for ev in ("logreg", "knn"):
        assert np.array_equal(evaluation.fit_predict(ev, X, y, X_test, 5), whole[ev])
    monkeypatch.setattr(evaluation, "DENSE_MAX", 0)  # the training matrix stays sparse
    assert sp_input_used(evaluation._fit_input(X))
    sparse_fit = evaluation.fit_predict("logreg", X, y, X_test, 5)
    assert np.mean(sparse_fit == whole["logreg"]) > 0.98 and np.mean(sparse_fit == y_test) > 0.8


def sp_input_used(X) -> bool:
    import scipy.sparse as sp

    return sp.issparse(X) and X.dtype == np.float32


def test_fidelity_of_a_large_site_uses_a_seeded_subset_of_its_cells(
    example_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    X, y, _, _ = _kang_split(example_path)
    syn, y_syn = X[::25].toarray(), y[::25]  # synthetic stand-ins of every class
    full = evaluation.fidelity(X, y, syn, y_syn)
    monkeypatch.setattr(evaluation, "FIDELITY_MAX_CELLS", 300)
    part = evaluation.fidelity(X, y, syn, y_syn)
    again = evaluation.fidelity(X, y, syn, y_syn)
    values = [np.array(list(f.as_dict().values()), dtype=float) for f in (part, again, full)]
    assert np.array_equal(values[0], values[1], equal_nan=True) and not np.array_equal(
        values[0], values[2], equal_nan=True
    )  # seeded, fewer cells
    assert abs(part.mean_corr - full.mean_corr) < 0.05 and abs(part.zero_fraction_real - full.zero_fraction_real) < 0.03


def test_weights_of_one_over_s_make_s_copies_of_a_row_count_as_one() -> None:
    """The logistic regression's L2 penalty is fixed while its loss sums over rows: S copies of every row fit a
    larger model than the rows once, unless each copy weighs 1 / S (what decode_reference.py --weigh-draws does)."""
    rng = np.random.default_rng(0)
    X = np.r_[rng.normal(0.0, 1.0, (20, 5)), rng.normal(1.0, 1.0, (20, 5))].astype(np.float32)
    y = np.repeat([0, 1], 20)
    once = evaluation.fit_logreg(X, y, seed=0).coef_
    copies, labels = np.tile(X, (10, 1)), np.tile(y, 10)
    weighted = evaluation.fit_logreg(copies, labels, seed=0, sample_weight=np.full(len(labels), 0.1)).coef_
    plain = evaluation.fit_logreg(copies, labels, seed=0).coef_
    np.testing.assert_allclose(weighted, once, rtol=1e-3, atol=1e-4)
    assert np.linalg.norm(plain) > 1.2 * np.linalg.norm(once)
