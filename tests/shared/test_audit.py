"""The privacy audit must catch a leak: uploaded copies of real cells score >= 0.95, independent samples about 0.5."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.audit import AUDIT_KEYS, audit, dcr_share, density_mia, distance_mia, random_members
from shared.data import prepare_site, read_h5ad

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def population() -> dict[str, np.ndarray]:
    """Train, held-out and reference cells drawn from one distribution (a 20-d Gaussian population)."""
    return {"train": RNG.normal(size=(1000, 20)), "holdout": RNG.normal(size=(600, 20)), "reference": RNG.normal(size=(600, 20)),
            "fresh": RNG.normal(size=(300, 20)).astype(np.float32)}


def test_copies_of_the_seed_cells_score_near_one(population: dict[str, np.ndarray]) -> None:
    members = np.arange(0, 1000, 5)  # 200 seed cells, uploaded unchanged
    a = audit(population["train"], members, population["holdout"], population["reference"], population["train"][members].astype(np.float32))
    assert a.seed_mia >= 0.95 and a.density_mia >= 0.95 and a.dcr_share >= 0.95, a
    assert a.population_mia < 0.7, a  # the population audit is blind to a few copies among many training cells


def test_copies_of_every_training_cell_reach_the_population_audit(population: dict[str, np.ndarray]) -> None:
    a = audit(population["train"], np.arange(200), population["holdout"], population["reference"], population["train"].astype(np.float32))
    assert a.population_mia >= 0.95, a


def test_independent_samples_score_about_one_half(population: dict[str, np.ndarray]) -> None:
    a = audit(population["train"], np.arange(0, 1000, 5), population["holdout"], population["reference"], population["fresh"])
    for key in AUDIT_KEYS:
        assert abs(getattr(a, key) - 0.5) < 0.1, (key, a)


def test_held_out_copies_do_not_look_like_members(population: dict[str, np.ndarray]) -> None:
    members = np.arange(0, 1000, 5)
    copies = population["holdout"][:200].astype(np.float32)
    assert distance_mia(population["train"][members], population["holdout"], copies) < 0.5
    assert dcr_share(population["train"], members, population["holdout"], copies) < 0.1


def test_too_few_cells_give_nan_not_a_number_that_looks_safe(population: dict[str, np.ndarray]) -> None:
    syn = population["fresh"]
    assert math.isnan(distance_mia(population["train"][:3], population["holdout"], syn))
    assert math.isnan(density_mia(population["train"][:50], population["holdout"], population["reference"][:2], syn))
    assert math.isnan(dcr_share(population["train"], np.arange(3), population["holdout"][:3], syn))
    assert math.isnan(distance_mia(population["train"], population["holdout"], np.zeros((0, 20), np.float32)))


def test_random_members_draws_the_requested_cells_per_class() -> None:
    labels = np.repeat([0, 1, 2], [10, 3, 7])
    m = random_members(labels, {0: 4, 1: 5, 2: 2}, seed=0)
    assert np.bincount(labels[m], minlength=3).tolist() == [4, 3, 2] and len(np.unique(m)) == len(m)


def test_copied_real_cells_are_caught_on_real_data(example_path) -> None:
    """Kang: 50 training cells uploaded unchanged. The population audit scored this leak 0.576 in the first release."""
    site = prepare_site(read_h5ad(example_path), label_key="cell_type", seed=0)
    train, test, val = site.X[site.train_idx], site.X[site.test_idx], site.X[site.val_idx]
    members = np.sort(np.random.default_rng(1).permutation(train.shape[0])[:50])
    a = audit(train, members, test, val, train[members].toarray())
    assert a.seed_mia >= 0.95 and a.density_mia >= 0.95 and a.dcr_share >= 0.95, a
    assert a.population_mia < 0.7, a
