"""dp-pretraining=statistics: the server's pretraining set is drawn from the sites' released class means only."""

from __future__ import annotations

import numpy as np
import pytest

from server.config import FederationConfig
from server.dp_pretrain import LOG_MAX, MIN_CELLS, draw_cells, server_budgets
from server.errors import FederationStopped
from shared.pretrain import PretrainConfig


def test_cells_are_drawn_around_each_released_mean() -> None:
    means = [np.array([[3.0, 0.0, 5.0], [0.0, 4.0, 0.0]]), np.array([[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]])]
    counts = [np.array([400, 300]), np.array([200, MIN_CELLS - 1])]  # the last class is too small to draw from
    X, y = draw_cells(means, counts, seed=0)
    assert X.shape == (900, 3) and np.bincount(y).tolist() == [600, 300]
    dense = X.toarray()
    assert dense.min() >= 0.0 and dense.max() <= LOG_MAX
    assert np.allclose(dense[:400].mean(0), means[0][0], atol=0.3)
    assert np.allclose(dense[400:700].mean(0), means[0][1], atol=0.3)
    assert np.allclose(dense[700:].mean(0), means[1][0], atol=0.3)
    assert np.all(dense[:400, 1] == 0.0)  # a gene the class does not express stays at zero
    again, _ = draw_cells(means, counts, seed=0)
    assert (again != X).nnz == 0  # seeded


def test_the_draw_is_scaled_down_to_its_cap_and_refuses_nothing_to_draw() -> None:
    means, counts = [np.ones((2, 4))], [np.array([3000, 1000])]
    _, y = draw_cells(means, counts, seed=1, max_cells=400)
    assert np.bincount(y).tolist() == [300, 100]
    with pytest.raises(FederationStopped, match=r"nothing-released.*no class with at least 5 released cells"):
        draw_cells([np.ones((2, 4))], [np.array([MIN_CELLS - 1, 0])], seed=0)


def test_the_server_trains_as_long_as_one_site_would_in_fedavg() -> None:
    vae, scdg = server_budgets(FederationConfig(seed=3))
    pre = PretrainConfig()
    assert (vae.steps, scdg.steps, vae.lr, vae.batch_size, vae.seed) == (
        pre.vae.steps,
        pre.scdg.steps,
        pre.vae.lr,
        pre.vae.batch_size,
        3,
    )
    short, _ = server_budgets(FederationConfig(num_pretrain_rounds=2, vae_local_steps=5, pretrain_lr=0.01))
    assert (short.steps, short.lr) == (10, 0.01)
