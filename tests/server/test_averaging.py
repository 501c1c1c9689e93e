"""Pure server aggregation: plan vocabulary, FedAvg, latent moments, metric aggregation (no Flower runtime)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.averaging import aggregate_scores, fedavg, latent_moments
from shared.data import gene_stats, select_variable_genes
from shared.plan import plan_center, plan_vocabulary, profile_of


def test_plan_equals_the_pooled_variable_genes_of_the_shared_genes() -> None:
    rng = np.random.default_rng(0)
    Xa, Xb = rng.poisson(1.0, (30, 6)).astype(float), rng.poisson(2.0, (20, 5)).astype(float)
    a = profile_of("b-site", Xa, ["g0", "g1", "g2", "g3", "g4", "only_a"], ("T", "B"))
    b = profile_of("a-site", Xb[:, ::-1], ["g4", "g3", "g2", "g1", "g0"], ("mono",))
    genes, classes = plan_vocabulary([a, b], n_genes=3)
    pooled = np.vstack([Xb, Xa[:, :5]])
    expected = select_variable_genes(["g0", "g1", "g2", "g3", "g4"], *gene_stats(pooled), pooled.shape[0], n_top=3)
    assert sorted(genes) == sorted(expected) and "only_a" not in genes
    assert classes == ["B", "T", "mono"]


def test_the_plan_center_is_the_pooled_mean_of_the_sites_that_have_each_gene() -> None:
    rng = np.random.default_rng(2)
    Xa, Xb = rng.poisson(1.0, (30, 3)).astype(float), rng.poisson(3.0, (10, 2)).astype(float)
    a = profile_of("a", Xa, ["g0", "g1", "only_a"], ("T",))
    b = profile_of("b", Xb[:, ::-1], ["g1", "g0"], ("B",))
    center = plan_center([a, b], ["g0", "g1", "only_a", "nowhere"])
    pooled = np.vstack([Xa[:, :2], Xb]).mean(0)
    assert np.allclose(center, [pooled[0], pooled[1], Xa[:, 2].mean(), 0.0])


def test_plan_refuses_sites_without_shared_genes() -> None:
    a = profile_of("a", np.ones((2, 1)), ["x"], ("T",))
    b = profile_of("b", np.ones((2, 1)), ["y"], ("T",))
    with pytest.raises(ValueError, match="share no gene"):
        plan_vocabulary([a, b], n_genes=5)


def test_fedavg_is_the_example_weighted_mean_and_keeps_dtypes() -> None:
    s1 = {"w": np.array([1.0, 2.0], np.float32), "steps": np.array([3], np.int64)}
    s2 = {"w": np.array([3.0, 6.0], np.float32), "steps": np.array([9], np.int64)}
    out = fedavg([s1, s2], [1, 3])
    assert np.allclose(out["w"], [2.5, 5.0]) and out["w"].dtype == np.float32
    assert out["steps"].tolist() == [3]
    with pytest.raises(ValueError):
        fedavg([s1], [1, 2])
    with pytest.raises(ValueError):
        fedavg([s1, s2], [0, 0])


def test_latent_moments_match_pooled_mean_and_std() -> None:
    rng = np.random.default_rng(1)
    parts = [rng.normal(i, 1 + i, (n, 3)) for i, n in enumerate([5, 17, 9])]
    mean, std = latent_moments([p.sum(0) for p in parts], [(p**2).sum(0) for p in parts], [len(p) for p in parts])
    pooled = np.vstack(parts)
    assert np.allclose(mean, pooled.mean(0)) and np.allclose(std, pooled.std(0))


def _site(acc: float, n: int, mia: float = 0.5, val_acc: float = 0.7, n_val: int = 5) -> dict:
    scores = {ev: {"accuracy": acc, "macro_f1": acc / 2, "per_class_recall": [acc]} for ev in ("mlp", "logreg")}
    val = {
        ev: {"accuracy": val_acc, "macro_f1": val_acc / 2, "per_class_recall": [val_acc]} for ev in ("mlp", "logreg")
    }
    fid = {
        "mmd_pca": 0.1,
        "mean_corr": 0.9,
        "var_corr": 0.5,
        "marker_overlap": 0.4,
        "zero_fraction_real": 0.9,
        "zero_fraction_synthetic": 0.2,
    }
    aud = {"seed_mia": mia, "population_mia": 0.5, "density_mia": 0.6, "dcr_share": 0.5}
    aud |= {"seed_mia_null95": 0.6, "population_mia_null95": 0.55, "density_mia_null95": 0.6}
    return {"n_test": n, "scores": scores, "validation": {"n_val": n_val, "scores": val}, "fidelity": fid, "audit": aud}


def test_scores_aggregate_cell_weighted_and_macro() -> None:
    agg = aggregate_scores(
        {
            "b": _site(1.0, 30, mia=0.7, val_acc=0.9, n_val=3),
            "c": _site(0.5, 10, mia=float("nan"), val_acc=0.6, n_val=1),
            "a": _site(0.5, 10, mia=0.6),
        },
        ["mlp", "logreg"],
    )
    assert agg["cell_weighted"]["mlp"]["accuracy"] == pytest.approx((1.0 * 30 + 0.5 * 20) / 50)
    assert agg["macro"]["mlp"]["accuracy"] == pytest.approx(2 / 3)
    assert (
        agg["validation"]["cell_weighted"]["mlp"]["accuracy"] == pytest.approx((0.9 * 3 + 0.6 * 1 + 0.7 * 5) / 9)
        and agg["n_val"] == 9
    )
    assert agg["audit"]["seed_mia"] == pytest.approx(0.65) and agg["audit"]["seed_mia_max"] == 0.7  # NaN sites left out
    assert agg["audit"]["density_mia"] == pytest.approx(0.6) and agg["fidelity"]["marker_overlap"] == pytest.approx(0.4)
    assert (
        agg["fidelity_cell_weighted"]["zero_fraction_synthetic"] == pytest.approx(0.2)
        and "marker_overlap" not in agg["macro"]
    )
    assert agg["n_test"] == 50 and agg["n_sites"] == 3
    assert not math.isnan(agg["cell_weighted"]["mlp"]["macro_f1"])


def test_plan_within_a_reference_keeps_its_genes_only_and_refuses_no_overlap() -> None:
    rng = np.random.default_rng(1)
    a = profile_of("a", rng.poisson(1.0, (20, 4)).astype(float), ["g0", "g1", "g2", "g3"], ("T",))
    b = profile_of("b", rng.poisson(1.0, (20, 4)).astype(float), ["g0", "g1", "g2", "g3"], ("B",))
    genes, _ = plan_vocabulary([a, b], n_genes=4, allowed={"g1", "g3", "other"})
    assert sorted(genes) == ["g1", "g3"]
    with pytest.raises(ValueError, match="init-path reference"):
        plan_vocabulary([a, b], n_genes=4, allowed={"x"})
