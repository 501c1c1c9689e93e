"""Distillation, baselines and evaluation on real (bundled) data with small budgets."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import shared.distill as distill_module
from server.bench.baselines import coreset, distribution_matching, gaussian
from shared.data import read_h5ad
from shared.distill import Codes, DistillConfig, cluster_centres, distill_codes, generate, resolve_t_star
from shared.distill import warm_start_fits as codes_fit_again
from shared.errors import ConfigError
from shared.evaluation import fidelity, fit_predict, score
from shared.fitting import TrainConfig
from shared.pretrain import PretrainConfig, latent_dim_for, pretrain
from shared.sites import Federation, prepare_federation, split_sites
from shared.synthetic import fuse, provenance, to_anndata

SMALL = PretrainConfig(vae=TrainConfig(steps=500, batch_size=128), scdg=TrainConfig(steps=600, batch_size=256))


@pytest.fixture(scope="module")
def fed(example_path) -> Federation:
    parts = split_sites(read_h5ad(example_path), label_key="cell_type", site_key="batch")
    return prepare_federation(parts, label_key="cell_type", n_genes=500, seed=0)


@pytest.fixture(scope="module")
def pre(fed: Federation):
    X, y = fed.pooled("train")
    return pretrain(X, y, len(fed.classes), SMALL)


def test_federation_split_by_batch(fed: Federation) -> None:
    assert fed.names == ("ctrl101", "ctrl107", "stim101", "stim107")
    assert len(fed.genes) == 500
    assert fed.classes == ("B cells", "CD14+ Monocytes", "CD4 T cells", "CD8 T cells", "FCGR3A+ Monocytes")
    for i in range(4):
        X, y = fed.train(i)
        assert X.shape[1] == 500 and len(y) == X.shape[0]


def test_codes_have_the_promised_shape_and_size(fed: Federation, pre) -> None:
    X, y = fed.train(0)
    cfg = DistillConfig(k=3, iterations=5)
    codes = distill_codes(pre.vae, pre.scdg, X, y, cfg)
    n_cls = len(np.unique(y))
    d = pre.vae.config.latent_dim
    assert d == 24  # chosen from 500 genes: a code (24 floats + label) is 1/20 of a cell (500 floats + label)
    assert codes.codes.shape == (3 * n_cls, d) and codes.codes.dtype == np.float32
    assert sorted(np.unique(codes.labels)) == sorted(np.unique(y))
    assert codes.nbytes == 3 * n_cls * d * 4 + 3 * n_cls * 4
    assert (500 * 4 + 4) / (d * 4 + 4) >= 20
    cells = generate(pre.vae, pre.scdg, codes, mode="expected")
    assert cells.shape == (3 * n_cls, 500) and np.isfinite(cells).all() and (cells >= 0).all()


def test_optimisation_moves_codes_and_lowers_no_generator_weight(fed: Federation, pre) -> None:
    X, y = fed.train(1)
    before = {k: v.clone() for k, v in pre.scdg.state_dict().items()}
    c0 = distill_codes(pre.vae, pre.scdg, X, y, DistillConfig(k=2, iterations=0, seed=3))
    c1 = distill_codes(pre.vae, pre.scdg, X, y, DistillConfig(k=2, iterations=20, seed=3))
    assert not np.allclose(c0.codes, c1.codes)
    for k, v in pre.scdg.state_dict().items():
        assert torch.equal(v, before[k]), f"generator weight {k} changed during distillation"


def test_warm_start_uses_previous_codes(fed: Federation, pre) -> None:
    X, y = fed.train(2)
    first = distill_codes(pre.vae, pre.scdg, X, y, DistillConfig(k=2, iterations=0, seed=1))
    again = distill_codes(pre.vae, pre.scdg, X, y, DistillConfig(k=2, iterations=0, seed=99), init_codes=first)
    np.testing.assert_allclose(again.codes, first.codes[np.argsort(first.labels, kind="stable")])


def test_no_class_gets_more_codes_than_cells(fed: Federation, pre) -> None:
    X, y = fed.train(0)
    classes, n = np.unique(y, return_counts=True)
    k = int(np.sort(n)[1])  # at least one class has fewer cells than k, at least two have k or more
    codes = distill_codes(pre.vae, pre.scdg, X, y, DistillConfig(k=k, iterations=2))
    got = dict(zip(*np.unique(codes.labels, return_counts=True), strict=True))
    assert got == {int(c): min(int(m), k) for c, m in zip(classes, n, strict=True)}
    assert any(m < k for m in n)
    assert codes_fit_again(codes, y, k, pre.vae.config.latent_dim)
    assert not codes_fit_again(
        codes, y, k + 1, pre.vae.config.latent_dim
    )  # a class with >= k+1 cells now needs one more code
    assert not codes_fit_again(codes, y, k, pre.vae.config.latent_dim + 1)


def test_decoded_class_term_reaches_the_codes(fed: Federation, pre) -> None:
    X, y = fed.train(1)
    base = DistillConfig(k=2, iterations=10, seed=5, class_weight=0.0, prior_weight=0.0, gene_mean_weight=0.0)
    off = distill_codes(pre.vae, pre.scdg, X, y, base)
    on = distill_codes(pre.vae, pre.scdg, X, y, replace(base, decoded_class_weight=1.0))
    init = distill_codes(pre.vae, pre.scdg, X, y, replace(base, iterations=0))
    np.testing.assert_allclose(off.codes, init.codes)  # every term off: the codes do not move
    assert not np.allclose(on.codes, init.codes)  # the VAE label head's gradient reaches them


def test_latent_size_follows_the_gene_count() -> None:
    assert [latent_dim_for(g) for g in (20000, 2000, 1299, 1267, 690, 200, 50)] == [64, 64, 64, 62, 33, 9, 8]
    for g in (2000, 1267, 690, 200):
        assert (g + 1) / (latent_dim_for(g) + 1) >= 20


def test_t_star_resolution_and_config_errors() -> None:
    assert resolve_t_star(DistillConfig(k=1)) > resolve_t_star(DistillConfig(k=10))
    assert resolve_t_star(DistillConfig(k=10, t_star=123)) == 123
    with pytest.raises(ConfigError, match="t_star"):
        resolve_t_star(DistillConfig(t_star=5000))
    with pytest.raises(ConfigError, match="k >= 1"):
        DistillConfig(k=0)
    with pytest.raises(ConfigError, match="init"):
        DistillConfig(init="zeros")  # type: ignore[arg-type]


def test_kmeans_of_a_large_class_fits_a_sample_and_seeds_from_all_its_cells(monkeypatch) -> None:
    monkeypatch.setattr(distill_module, "KMEANS_MAX_CELLS", 100)
    fitted: list[int] = []

    class Recorded(distill_module.KMeans):
        def fit(self, X, y=None, sample_weight=None):
            fitted.append(len(X))
            return super().fit(X, y, sample_weight)

    monkeypatch.setattr(distill_module, "KMeans", Recorded)
    rng = np.random.default_rng(1)
    zs = torch.as_tensor(np.r_[rng.normal(-5.0, 1.0, (400, 4)), rng.normal(5.0, 1.0, (600, 4))], dtype=torch.float32)
    centres, nearest = cluster_centres(zs, 2, seed=0)
    assert sorted(np.round(centres.mean(1).numpy())) == [-5.0, 5.0]  # one centre per group, from the sample
    d = torch.cdist(centres, zs)  # the seeds are looked for among all 1000 cells, not the 100 of the sample
    assert nearest.tolist() == d.argmin(1).tolist()
    assert fitted == [100]


def test_kmeans_codes_start_from_cluster_centres(fed: Federation, pre) -> None:
    """A class of two distant groups of latents gets one centre in each (two random cells of 40 + 10 both land in the
    larger group in 64 % of draws), each code's seed row is a distinct cell nearest its centre, and a distillation
    started that way is seeded from cells of the code's class."""
    rng = np.random.default_rng(0)
    zs = torch.as_tensor(np.r_[rng.normal(-5.0, 0.1, (40, 6)), rng.normal(5.0, 0.1, (10, 6))], dtype=torch.float32)
    centres, nearest = cluster_centres(zs, 2, seed=0)
    means = np.sort([zs[:40].mean().item(), zs[40:].mean().item()])
    np.testing.assert_allclose(np.sort(centres.mean(1).numpy()), means, atol=1e-4)
    for centre, row in zip(centres.numpy(), nearest, strict=True):
        assert np.linalg.norm(zs.numpy() - centre, axis=1).argmin() == row
    _, rows = cluster_centres(torch.randn(500, 62, generator=torch.Generator().manual_seed(0)), 10, seed=0)
    assert len(set(rows.tolist())) == 10  # in one high-dimensional blob 2 of 10 centres share a nearest cell
    small, rows = cluster_centres(zs[:3], 5, seed=0)  # fewer cells than codes: the cells themselves
    assert torch.equal(small, zs[:3]) and rows.tolist() == [0, 1, 2]

    X, y = fed.train(0)
    cfg = DistillConfig(k=3, iterations=0, seed=2, init="kmeans")
    km = distill_codes(pre.vae, pre.scdg, X, y, cfg)
    real = distill_codes(pre.vae, pre.scdg, X, y, replace(cfg, init="real"))
    assert km.codes.shape == real.codes.shape and not np.allclose(km.codes, real.codes)
    assert km.seed_rows is not None and len(np.unique(km.seed_rows)) == len(km.seed_rows)
    assert (y[km.seed_rows] == km.labels).all()  # each seed is a cell of its code's class


def test_scdd_beats_random_real_cells_at_k1(fed: Federation, pre) -> None:
    X_test, y_test = fed.pooled("test")
    acc = {"scdd": [], "random": []}
    for seed in range(2):
        parts = [
            distill_codes(pre.vae, pre.scdg, *fed.train(i), DistillConfig(k=1, iterations=100, seed=seed))
            for i in range(4)
        ]
        codes = Codes(
            np.concatenate([p.codes for p in parts]),
            np.concatenate([p.labels for p in parts]),
            parts[0].t_star,
            parts[0].guidance,
        )
        cells = generate(pre.vae, pre.scdg, codes, mode="expected")
        acc["scdd"].append(score(y_test, fit_predict("mlp", cells, codes.labels, X_test, 5, seed=seed)).accuracy)
        rand = [coreset(*fed.train(i), 1, method="random", seed=seed) for i in range(4)]
        acc["random"].append(
            score(
                y_test,
                fit_predict(
                    "mlp",
                    np.concatenate([r.X for r in rand]),
                    np.concatenate([r.labels for r in rand]),
                    X_test,
                    5,
                    seed=seed,
                ),
            ).accuracy
        )
    assert np.mean(acc["scdd"]) > np.mean(acc["random"]) + 0.05, acc


def test_baselines_shapes_and_bytes(fed: Federation) -> None:
    X, y = fed.train(0)
    n_cls = len(np.unique(y))
    for method in ("random", "herding", "kcenter"):
        s = coreset(X, y, 4, method=method, seed=0)
        assert s.X.shape == (4 * n_cls, 500) and s.upload_bytes == s.X.nbytes + 4 * len(s.labels)
    g = gaussian(X, y, 4, seed=0)
    assert g.X.shape == (4 * n_cls, 500) and (g.X >= 0).all()
    dm = distribution_matching(X, y, 2, iterations=5, seed=0)
    assert dm.X.shape == (2 * n_cls, 500) and (dm.X >= 0).all()
    with pytest.raises(ValueError, match="unknown coreset"):
        coreset(X, y, 4, method="nope")


def test_herding_picks_a_mean_preserving_set() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 60)).astype(np.float32)
    y = np.zeros(300, dtype=np.int64)
    herd = coreset(X, y, 10, method="herding", seed=0)
    rand = coreset(X, y, 10, method="random", seed=0)
    assert np.linalg.norm(herd.X.mean(0) - X.mean(0)) < np.linalg.norm(rand.X.mean(0) - X.mean(0))


def test_fidelity_prefers_matching_cells() -> None:
    rng = np.random.default_rng(0)
    real = np.maximum(rng.normal(1, 1, size=(100, 30)), 0).astype(np.float32)
    y = np.repeat([0, 1], 50)
    good = fidelity(real, y, real[::2] + 0.01, y[::2])
    bad = fidelity(real, y, rng.normal(5, 1, size=(50, 30)).astype(np.float32), y[::2])
    assert good.mmd_pca < bad.mmd_pca and good.mean_corr > bad.mean_corr and good.var_corr > bad.var_corr
    assert 0 < good.zero_fraction_real < 1


def test_marker_overlap_is_high_for_real_cells_and_low_for_shuffled_genes(fed: Federation) -> None:
    X, y = fed.train(0)
    X_test, y_test = fed.test(0)
    real = X.toarray()
    same = fidelity(X_test, y_test, real, y)
    shuffled = fidelity(X_test, y_test, real[:, np.random.default_rng(0).permutation(real.shape[1])], y)
    assert same.marker_overlap > 0.5 > 0.2 > shuffled.marker_overlap, (same.marker_overlap, shuffled.marker_overlap)


def test_synthetic_anndata_is_scanpy_ready_and_fuses(fed: Federation) -> None:
    X = np.abs(np.random.default_rng(0).normal(size=(6, len(fed.genes)))).astype(np.float32)
    a, b = (
        to_anndata(X, np.array(y), class_names=fed.classes, genes=fed.genes, site=s, round_=1, provenance={"k": 2})
        for s, y in (("A", [0, 0, 1, 1, 2, 2]), ("B", [3, 3, 4, 4, 4, 4]))
    )
    fused = fuse([a, b])
    assert fused.n_obs == 12 and list(fused.var_names) == list(fed.genes)
    assert set(fused.obs["site"]) == {"A", "B"} and fused.obs["synthetic"].all()
    assert fused.obs["cell_type"].value_counts()["FCGR3A+ Monocytes"] == 4
    assert provenance(fused) == {"k": 2}
    assert fused.obs_names.is_unique
    assert replace(DistillConfig(), k=3).k == 3


def test_a_large_class_mean_is_summed_in_blocks_to_the_same_value(monkeypatch) -> None:
    import scipy.sparse as sp

    from shared import distill

    rng = np.random.default_rng(0)
    X = sp.random(500, 40, density=0.2, format="csr", dtype=np.float32, random_state=1)
    rows = np.sort(rng.choice(500, 300, replace=False))
    whole = distill._rows_mean(X, rows)
    monkeypatch.setattr(distill, "MEAN_BLOCK", 64)
    assert np.allclose(distill._rows_mean(X, rows), whole, rtol=1e-5) and np.allclose(
        whole, X[rows].toarray().mean(0), rtol=1e-5
    )


def test_class_gene_means_leave_out_classes_of_too_few_cells() -> None:
    """recenter's class means: each class's mean over its rows, NaN rows for a class under min_cells or absent."""
    from shared.distill import class_gene_means

    rng = np.random.default_rng(0)
    X = rng.random((12, 4)).astype(np.float32)
    labels = np.array([0] * 6 + [2] * 4 + [3] * 2)
    means = class_gene_means(X, labels, 5, min_cells=4)
    assert np.allclose(means[0], X[:6].mean(0)) and np.allclose(means[2], X[6:10].mean(0))
    assert np.isnan(means[[1, 3, 4]]).all()  # absent, 2 cells, absent
