"""The privacy audit must catch a leak: uploaded copies of real cells score >= 0.95, independent samples about 0.5."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.audit import (
    AUDIT_KEYS,
    Scored,
    auc_of,
    audit,
    class_weights,
    dcr_share,
    density_scores,
    distance_scores,
    null_bound,
    random_members,
    ranked_auc,
)
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
    assert a.seed_mia_null95 < 0.65 and a.density_mia_null95 < 0.65, a  # the leak is far above chance
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
        if not key.endswith("_null95"):
            assert abs(getattr(a, key) - 0.5) < 0.1, (key, a)
    for key in ("seed_mia", "population_mia", "density_mia"):  # 160 members: chance reaches about 0.55
        assert 0.5 < getattr(a, f"{key}_null95") < 0.6, (key, a)


def test_class_weights_give_non_members_the_members_class_mix() -> None:
    members, others = np.array([0, 0, 1, 1, 2]), np.array([0, 0, 0, 0, 1, 3])
    w_m, w_o = class_weights(members, others)
    assert w_m.tolist() == [1, 1, 1, 1, 0]  # class 2 has no held-out cell to compare with
    assert w_o.tolist() == [0.5, 0.5, 0.5, 0.5, 2.0, 0.0]  # per class the weights sum to the members' count


def test_held_out_copies_do_not_look_like_members(population: dict[str, np.ndarray]) -> None:
    m, p = population["members"], population
    copies = p["holdout"][:200].astype(np.float32)
    assert auc_of(distance_scores(p["train"][m], p["y_train"][m], p["holdout"], p["y_holdout"], copies)) < 0.5
    assert dcr_share(p["train"], p["y_train"], m, p["holdout"], p["y_holdout"], copies) < 0.2


def test_too_few_cells_give_nan_not_a_number_that_looks_safe(population: dict[str, np.ndarray]) -> None:
    p, syn = population, population["fresh"]
    y3 = np.zeros(3, np.int64)
    assert math.isnan(auc_of(distance_scores(p["train"][:3], y3, p["holdout"], p["y_holdout"], syn)))
    assert math.isnan(
        auc_of(
            density_scores(p["train"][:50], p["y_train"][:50], p["holdout"], p["y_holdout"], p["reference"][:2], syn)
        )
    )
    assert math.isnan(dcr_share(p["train"], p["y_train"], np.arange(3), p["holdout"][:3], p["y_holdout"][:3], syn))
    assert math.isnan(
        auc_of(distance_scores(p["train"], p["y_train"], p["holdout"], p["y_holdout"], np.zeros((0, 20), np.float32)))
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
    assert 0.5 < a.seed_mia_null95 < 0.7 and 0.5 < a.population_mia_null95 < a.seed_mia_null95, a  # more cells


@pytest.mark.parametrize(("n", "low", "high"), [(60, 0.56, 0.62), (600, 0.515, 0.54)])
def test_null_bound_is_the_chance_spread_of_an_auc_at_these_sizes(n: int, low: float, high: float) -> None:
    """One class, n members and n non-members: the AUC without signal has sd sqrt((2n + 1) / (12 n^2)) (Mann-Whitney),
    so its 95th percentile is 0.587 at 60 + 60 and 0.527 at 600 + 600."""
    rng = np.random.default_rng(3)
    s = Scored(rng.normal(size=n), rng.normal(size=n), np.zeros(n, np.int64), np.zeros(n, np.int64))
    expected = 0.5 + 1.645 * math.sqrt((2 * n + 1) / (12 * n * n))
    bound = null_bound(s, np.random.default_rng(0))
    assert low < bound < high and abs(bound - expected) < 0.02, (bound, expected)
    assert bound == null_bound(s, np.random.default_rng(0))  # seeded


def test_null_bound_keeps_classes_apart() -> None:
    """Scores that differ by class only, with members and non-members in opposite class mixes: exchanging cells across
    classes would make a wide null; within classes the bound stays the chance spread of the members' count."""
    rng = np.random.default_rng(4)
    m_labels = np.repeat([0, 1], [80, 20])
    o_labels = np.repeat([0, 1], [20, 80])
    offset = np.array([0.0, 5.0])
    s = Scored(offset[m_labels] + rng.normal(size=100), offset[o_labels] + rng.normal(size=100), m_labels, o_labels)
    bound = null_bound(s, np.random.default_rng(0))
    assert 0.53 < bound < 0.65, bound


def test_null_bound_is_nan_where_the_auc_is() -> None:
    s = Scored(np.zeros(3), np.zeros(30), np.zeros(3, np.int64), np.zeros(30, np.int64))
    assert math.isnan(null_bound(s, np.random.default_rng(0)))


def test_ranked_auc_is_scikit_learns_weighted_auc_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(5)
    scores = rng.integers(0, 8, 60).astype(float)  # many ties
    member = rng.random(60) < 0.4
    w = rng.random(60) + 0.1
    _, tie = np.unique(scores, return_inverse=True)
    fast = ranked_auc(tie, np.where(member, w, 0.0), np.where(member, 0.0, w))
    assert fast == pytest.approx(roc_auc_score(member, scores, sample_weight=w), abs=1e-12)
