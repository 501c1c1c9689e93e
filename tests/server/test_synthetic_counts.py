"""The fused synthetic AnnData with count input: counts and expected layers, X by decode mode, the fallback, and
scanpy."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import scanpy as sc
import torch

from server.synthesis import SiteCodes, fresh_models, fuse_round
from shared.distill import Codes, generate
from shared.protocol import Plan

GENES, CLASSES, K, D = 200, 3, 30, 8
PLAN = Plan(genes=tuple(f"g{i}" for i in range(GENES)), classes=("B", "T", "mono"))
LIBRARY = np.array([[7.5, 0.3, 0.6], [8.0, 0.4, 0.5], [7.0, 0.2, 0.7]], np.float32)


def _parts(library_b: np.ndarray = LIBRARY) -> list[SiteCodes]:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(CLASSES), K)
    return [
        SiteCodes(site, Codes(rng.normal(size=(labels.size, D)).astype(np.float32), labels, 5, 1.0), library=lib)
        for site, lib in (("site-a", LIBRARY), ("site-b", library_b))
    ]


def _models():
    vae, scdg = fresh_models(PLAN, latent_dim=D, seed=0, count_head=True)
    with torch.no_grad():  # class-dependent proportions, so that the classes differ in their counts
        vae.count_head.to_rho.bias.copy_(torch.linspace(-3, 3, GENES))
    return vae, scdg


def test_counts_layer_and_x_by_decode_mode() -> None:
    vae, scdg = _models()
    parts = _parts()
    fused = {
        mode: fuse_round(parts, vae, scdg, PLAN, round_=1, provenance={}, mode=mode, seed=3)
        for mode in ("counts", "expected", "sample")
    }
    counts = fused["counts"].layers["counts"].toarray()
    assert set(fused["counts"].layers) == {"counts", "expected"}
    assert (counts >= 0).all() and np.array_equal(counts, np.round(counts)) and counts.sum() > 0
    # X of "counts" is those counts on the real cells' scale: log1p(counts / L * 1e4), zero exactly where the count is
    X = fused["counts"].X.toarray()
    assert np.array_equal(X > 0, counts > 0) and X.max() < np.log1p(1e4)
    # "expected" puts the decoder's expected expression in X (as before this layer existed) and in the layer
    expected = np.vstack([generate(vae, scdg, p.codes, mode="expected") for p in parts])
    assert np.allclose(fused["expected"].X.toarray(), expected, atol=1e-6)
    assert np.allclose(fused["counts"].layers["expected"].toarray(), expected, atol=1e-6)
    # every mode samples the same counts (same seed), whatever X holds
    assert np.array_equal(fused["sample"].layers["counts"].toarray(), counts)


def test_gaussian_mode_draws_samples_per_code_cells_around_each_code() -> None:
    vae, scdg = _models()
    parts = _parts()
    fused = fuse_round(parts, vae, scdg, PLAN, round_=1, provenance={}, mode="gaussian", seed=3, samples_per_code=4)
    n_codes = sum(len(p.codes.labels) for p in parts)
    assert fused.n_obs == 4 * n_codes
    labels = np.concatenate([np.repeat(p.codes.labels, 4) for p in parts])
    assert np.array_equal(fused.obs["cell_type"].cat.codes.to_numpy(), labels)
    # the expected layer is each code's expected expression, repeated; X scatters around it (never below 0)
    expected = np.vstack([np.repeat(generate(vae, scdg, p.codes, mode="expected"), 4, axis=0) for p in parts])
    X = fused.X.toarray()
    assert np.allclose(fused.layers["expected"].toarray(), expected, atol=1e-6)
    assert (X >= 0).all() and not np.allclose(X, expected, atol=1e-3)
    assert abs(float((X - expected).mean())) < 0.05
    assert '"decode": "gaussian"' in fused.uns["fedscdd"]["provenance_json"]
    assert '"samples_per_code": 4' in fused.uns["fedscdd"]["provenance_json"]


def test_recentering_moves_each_class_of_a_site_onto_the_mean_it_released() -> None:
    vae, scdg = _models()
    parts = _parts()
    rng = np.random.default_rng(1)
    means = {"site-a": rng.uniform(0.0, 2.0, (CLASSES, GENES)).astype(np.float32)}
    means["site-a"][2] = 0.0  # a class whose name the site did not release: left as decoded
    plain = fuse_round(parts, vae, scdg, PLAN, round_=1, provenance={}, mode="expected", seed=3)
    fused = fuse_round(parts, vae, scdg, PLAN, round_=1, provenance={}, mode="expected", seed=3, class_means=means)
    site = fused.obs["site"].to_numpy()
    labels = fused.obs["cell_type"].cat.codes.to_numpy()
    X, before = fused.X.toarray(), plain.X.toarray()
    for c in range(2):  # the class's cells now average to the released mean (up to clipping at 0), spread unchanged
        rows = (site == "site-a") & (labels == c)
        unclipped = (X[rows] > 0).all(axis=0)
        assert unclipped.mean() > 0.5
        assert np.allclose(X[rows].mean(0)[unclipped], means["site-a"][c][unclipped], atol=1e-4)
        assert np.allclose(X[rows].std(0)[unclipped], before[rows].std(0)[unclipped], atol=1e-4)
    untouched = (site == "site-b") | (labels == 2)
    assert np.allclose(X[untouched], before[untouched])
    assert np.allclose(fused.layers["expected"].toarray(), before)  # the layer keeps the decoder's own expression
    # gaussian cells are drawn around the shifted expression
    drawn = fuse_round(
        parts, vae, scdg, PLAN, round_=1, provenance={}, mode="gaussian", seed=3, samples_per_code=8, class_means=means
    )
    rows = (drawn.obs["site"].to_numpy() == "site-a") & (drawn.obs["cell_type"].cat.codes.to_numpy() == 0)
    gap = drawn.X.toarray()[rows].mean(0) - means["site-a"][0]
    assert abs(float(gap.mean())) < 0.05 and float(np.abs(gap).mean()) < 0.2
    assert float(np.abs(drawn.layers["expected"].toarray()[rows].mean(0) - means["site-a"][0]).mean()) > 0.3


def test_scaling_moves_each_class_onto_its_mean_and_keeps_zeros_and_relative_spread() -> None:
    """recenter (without DP): each gene of a class is multiplied by target / decoded mean (capped), a zero stays a
    zero, the coefficient of variation is kept; a gene the decoder leaves at zero is shifted to its target."""
    from server.synthesis import SCALE_CAP, recenter

    rng = np.random.default_rng(0)
    X = rng.uniform(0.5, 1.5, (12, 6)).astype(np.float32)
    X[0, 1] = 0.0
    X[:6, 4] = 0.0  # class 0: the decoder leaves gene 4 at zero
    X[:6, 5] = 0.01  # class 0: a tiny gene whose target asks for more than the cap
    labels = np.repeat([0, 1], 6)
    means = np.stack([np.full(6, 2.0), np.zeros(6)]).astype(np.float32)  # class 1 released nothing: left alone
    out = recenter(X, labels, means, "scale")
    assert np.allclose(out[:6, :4].mean(0), 2.0, atol=1e-5) and out[0, 1] == 0.0
    cv = lambda a: a.std(0) / a.mean(0)  # noqa: E731
    assert np.allclose(cv(out[:6, :4]), cv(X[:6, :4]), atol=1e-5)
    assert np.allclose(out[:6, 4], 2.0) and np.allclose(out[:6, 5], 0.01 * SCALE_CAP)
    assert np.array_equal(out[6:], X[6:])
    shifted = recenter(X, labels, means, "shift")  # the DP path's form: same means, spread unchanged, zeros move
    assert np.allclose(shifted[:6, :4].mean(0), 2.0, atol=1e-5) and shifted[0, 1] > 0
    vae, scdg = _models()
    fused = fuse_round(
        _parts(),
        vae,
        scdg,
        PLAN,
        round_=1,
        provenance={},
        mode="expected",
        seed=3,
        class_means={"site-a": np.full((CLASSES, GENES), 1.0, np.float32)},
        recenter_how="scale",
    )
    assert '"recenter": "scale"' in fused.uns["fedscdd"]["provenance_json"]


def test_without_count_input_at_a_site_there_are_no_counts_and_x_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    vae, scdg = _models()
    parts = _parts(np.full((CLASSES, 3), np.nan, np.float32))  # site-b holds log-normalised data only
    with caplog.at_level(logging.WARNING, logger="server.synthesis"):
        fused = fuse_round(parts, vae, scdg, PLAN, round_=1, provenance={}, mode="counts", seed=3)
    assert "counts" not in fused.layers and "decoding 'expected' instead" in caplog.text
    assert np.allclose(fused.X.toarray(), fused.layers["expected"].toarray())
    assert '"decode": "expected"' in fused.uns["fedscdd"]["provenance_json"]
    plain = fresh_models(PLAN, latent_dim=D, seed=0)[0]  # a VAE trained without count input has no count head
    assert (
        "counts" not in fuse_round(_parts(), plain, scdg, PLAN, round_=1, provenance={}, mode="expected", seed=3).layers
    )


@pytest.mark.slow  # over 5 s: outside the fast tier
def test_a_standard_scanpy_workflow_runs_on_the_counts_layer() -> None:
    vae, scdg = _models()
    adata = fuse_round(_parts(), vae, scdg, PLAN, round_=1, provenance={}, mode="counts", seed=3)
    adata.X = adata.layers["counts"].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scanpy's future-default notices
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.pp.highly_variable_genes(adata, n_top_genes=100)
        sc.pp.pca(adata, n_comps=20)
        sc.pp.neighbors(adata, n_neighbors=10)
        sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False, random_state=0)
        sc.tl.rank_genes_groups(adata, groupby="cell_type", method="wilcoxon")
    assert adata.obs["leiden"].nunique() >= 2
    assert adata.uns["rank_genes_groups"]["names"].shape[0] == GENES


def test_sampling_modes_draw_several_cells_per_code_and_expected_does_not() -> None:
    vae, scdg = _models()
    parts = _parts()
    one = fuse_round(parts, vae, scdg, PLAN, round_=1, provenance={}, mode="counts", seed=3)
    three = fuse_round(parts, vae, scdg, PLAN, round_=1, provenance={}, mode="counts", seed=3, samples_per_code=3)
    assert three.n_obs == 3 * one.n_obs and three.layers["counts"].shape == three.X.shape
    # each code's cells are consecutive, of its class, with the same expected expression but their own counts
    assert (three.obs["cell_type"].to_numpy()[::3] == one.obs["cell_type"].to_numpy()).all()
    ex = three.layers["expected"].toarray()
    assert np.allclose(ex[0::3], ex[1::3]) and not np.array_equal(
        three.layers["counts"].toarray()[0::3], three.layers["counts"].toarray()[1::3]
    )
    assert (
        fuse_round(parts, vae, scdg, PLAN, round_=1, provenance={}, mode="expected", seed=3, samples_per_code=3).n_obs
        == one.n_obs
    )
