"""The privacy audit must catch a leak: uploaded copies of real cells score >= 0.95, independent samples about 0.5."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.audit import AUDIT_KEYS, audit, class_weights, dcr_share, density_mia, distance_mia, random_members
from shared.data import prepare_site, read_h5ad

RNG = np.random.default_rng(0)


def _cells(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 20-d population of 4 classes, each a unit Gaussian around its own centre."""
    centres = np.arange(4)[:, None] * 3.0 * np.eye(4, 20)
    return centres[labels] + rng.normal(size=(len(labels), 20))


@pytest.fixture(scope="module")
def population() -> dict[str, np.ndarray]:
    """Train, held-out, reference and fresh cells of one imbalanced 4-class population (classes 60/25/10/5 %)."""
    p = [0.6, 0.25, 0.1, 0.05]
    out: dict[str, np.ndarray] = {}
    for part, n in (("train", 1500), ("holdout", 800), ("reference", 800)):
        out[f"y_{part}"] = RNG.choice(4, size=n, p=p)
        out[part] = _cells(out[f"y_{part}"], RNG)
    out["members"] = random_members(out["y_train"], {c: 40 for c in range(4)}, seed=1)  # class-balanced, as seeds are
    out["fresh"] = _cells(np.repeat(np.arange(4), 40), RNG).astype(
        np.float32
    )  # k per class, independent of every real cell
    return out


def _audit(pop: dict[str, np.ndarray], X_syn: np.ndarray, members: np.ndarray, *, aligned: bool = False):
    return audit(
        pop["train"],
        pop["y_train"],
        members,
        pop["holdout"],
        pop["y_holdout"],
        pop["reference"],
        X_syn,
        aligned=aligned,
    )


def test_copies_of_the_seed_cells_score_near_one(population: dict[str, np.ndarray]) -> None:
    m = population["members"]
    a = _audit(population, population["train"][m].astype(np.float32), m, aligned=True)
    assert a.seed_mia >= 0.95 and a.density_mia >= 0.95 and a.dcr_share >= 0.95, a
    assert a.population_mia < 0.7, a  # the population audit is blind to a few copies among many training cells


def test_copies_of_every_training_cell_reach_the_population_audit(population: dict[str, np.ndarray]) -> None:
    a = _audit(population, population["train"].astype(np.float32), population["members"])
    assert a.population_mia >= 0.95, a


def test_independent_samples_score_about_one_half_despite_class_balanced_seeds(
    population: dict[str, np.ndarray],
) -> None:
    """k synthetic cells per class vs held-out cells in the site's class mix: without class matching this scored well
    above 0.5."""
    a = _audit(population, population["fresh"], population["members"], aligned=True)
    for key in AUDIT_KEYS:
        assert abs(getattr(a, key) - 0.5) < 0.1, (key, a)


def test_class_weights_give_non_members_the_members_class_mix() -> None:
    members, others = np.array([0, 0, 1, 1, 2]), np.array([0, 0, 0, 0, 1, 3])
    w_m, w_o = class_weights(members, others)
    assert w_m.tolist() == [1, 1, 1, 1, 0]  # class 2 has no held-out cell to compare with
    assert w_o.tolist() == [0.5, 0.5, 0.5, 0.5, 2.0, 0.0]  # per class the weights sum to the members' count


def test_held_out_copies_do_not_look_like_members(population: dict[str, np.ndarray]) -> None:
    m, p = population["members"], population
    copies = p["holdout"][:200].astype(np.float32)
    assert distance_mia(p["train"][m], p["y_train"][m], p["holdout"], p["y_holdout"], copies) < 0.5
    assert dcr_share(p["train"], p["y_train"], m, p["holdout"], p["y_holdout"], copies) < 0.2


def test_too_few_cells_give_nan_not_a_number_that_looks_safe(population: dict[str, np.ndarray]) -> None:
    p, syn = population, population["fresh"]
    y3 = np.zeros(3, np.int64)
    assert math.isnan(distance_mia(p["train"][:3], y3, p["holdout"], p["y_holdout"], syn))
    assert math.isnan(
        density_mia(p["train"][:50], p["y_train"][:50], p["holdout"], p["y_holdout"], p["reference"][:2], syn)
    )
    assert math.isnan(dcr_share(p["train"], p["y_train"], np.arange(3), p["holdout"][:3], p["y_holdout"][:3], syn))
    assert math.isnan(
        distance_mia(p["train"], p["y_train"], p["holdout"], p["y_holdout"], np.zeros((0, 20), np.float32))
    )


def test_random_members_draws_the_requested_cells_per_class() -> None:
    labels = np.repeat([0, 1, 2], [10, 3, 7])
    m = random_members(labels, {0: 4, 1: 5, 2: 2}, seed=0)
    assert np.bincount(labels[m], minlength=3).tolist() == [4, 3, 2] and len(np.unique(m)) == len(m)


def test_copied_real_cells_are_caught_on_real_data(example_path) -> None:
    """Kang: 50 training cells uploaded unchanged. The population audit scored this leak 0.576 in the first release."""
    site = prepare_site(read_h5ad(example_path), label_key="cell_type", seed=0)
    train, test, val = site.X[site.train_idx], site.X[site.test_idx], site.X[site.val_idx]
    y_train, y_test = site.labels[site.train_idx], site.labels[site.test_idx]
    members = random_members(y_train, {c: 10 for c in range(len(site.classes))}, seed=1)
    a = audit(train, y_train, members, test, y_test, val, train[members].toarray(), aligned=True)
    assert a.seed_mia >= 0.95 and a.density_mia >= 0.95 and a.dcr_share >= 0.95, a
    assert a.population_mia < 0.7, a
