"""The count head of the VAE: the negative-binomial likelihood, sampling, and counts recovered from log-normalised
input."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy import stats

from shared.counts import library_stats, plan_fraction, sample_counts, usable
from shared.data import normalize, prepare_site
from shared.models.likelihood import nb_log_prob, sample_nb
from shared.models.vae import VAE, VAEConfig, counts_from_lognorm


@pytest.mark.parametrize(
    ("x", "mu", "theta"), [(0, 0.5, 1.0), (3, 2.0, 0.5), (17, 10.0, 20.0), (0, 1e-3, 5.0), (250, 80.0, 3.0)]
)
def test_nb_log_prob_matches_scipy(x: int, mu: float, theta: float) -> None:
    # scipy's nbinom(n, p) with n = theta, p = theta / (theta + mu) has mean mu and variance mu + mu^2 / theta
    ref = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    got = nb_log_prob(torch.tensor([float(x)]), torch.tensor([mu]), torch.tensor([theta])).item()
    assert got == pytest.approx(ref, abs=1e-4)


def test_nb_log_prob_is_differentiable_and_peaks_at_the_right_mean() -> None:
    x = torch.full((200,), 4.0)
    mus = torch.linspace(0.5, 12.0, 200, requires_grad=True)
    lp = nb_log_prob(x, mus, torch.full((200,), 2.0))
    lp.sum().backward()
    assert mus.grad is not None and torch.isfinite(mus.grad).all()
    assert abs(mus[lp.argmax()].item() - 4.0) < 0.1


def test_sampled_counts_are_integers_with_the_nb_mean_and_variance() -> None:
    rng = np.random.default_rng(0)
    mu, theta = np.full(200_000, 6.0), np.full(200_000, 1.5)
    c = sample_nb(mu, theta, rng)
    assert c.dtype == np.float32 and (c >= 0).all() and np.array_equal(c, np.round(c))
    assert c.mean() == pytest.approx(6.0, rel=0.02) and c.var() == pytest.approx(6.0 + 36.0 / 1.5, rel=0.05)
    assert (sample_nb(np.zeros(5), np.ones(5), rng) == 0).all()


def test_counts_are_recovered_from_log_normalised_rows() -> None:
    counts = torch.tensor([[0.0, 3.0, 12.0], [1.0, 0.0, 250.0]])
    library = torch.tensor([40.0, 1000.0])  # totals over ALL genes (more than these three)
    x = torch.log1p(counts / library[:, None] * 1e4).float()
    assert torch.equal(counts_from_lognorm(x, library), counts)


def test_the_count_head_learns_counts_without_moving_the_rest_of_the_model() -> None:
    torch.manual_seed(0)
    genes, n = 20, 256
    rate = torch.rand(genes) * 5
    counts = torch.poisson(rate.expand(n, genes))
    library = counts.sum(1) / 0.5  # the plan genes hold half of each cell's counts
    x = torch.log1p(counts / library[:, None] * 1e4)
    torch.manual_seed(1)
    plain = VAE(VAEConfig(n_genes=genes, latent_dim=4, hidden=(16, 8)))
    torch.manual_seed(1)
    with_counts = VAE(VAEConfig(n_genes=genes, latent_dim=4, hidden=(16, 8), count_head=True))
    shared = {k: v for k, v in with_counts.state_dict().items() if not k.startswith("count_head.")}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in shared.items()) and set(shared) == set(
        plain.state_dict()
    )
    for model in (plain, with_counts):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(2)
        for _ in range(150):
            out = model.loss(x, library=library)
            opt.zero_grad()
            out.total.backward()
            opt.step()
    # the shared weights trained identically (the NB term reaches the count head only) ...
    assert all(
        torch.allclose(v, plain.state_dict()[k])
        for k, v in with_counts.state_dict().items()
        if not k.startswith("count_head.")
    )
    # ... and the count head fits the counts: proportions close to the true rates' shares
    rho, _theta = with_counts.count_head.parts(with_counts.encode(x)[0])
    assert torch.allclose(rho.mean(0), rate / rate.sum(), atol=0.02)
    assert out.counts.item() > 0 and plain.loss(x, library=library).counts.item() == 0.0


def _count_site(rng: np.random.Generator) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """Two classes of Poisson cells over 60 genes; the plan keeps the first 40. Returns (X of the plan genes, L, labels,
    counts)."""
    rates = np.vstack([rng.gamma(0.5, 4.0, 60), rng.gamma(0.5, 4.0, 60)])
    labels = np.repeat([0, 1], 150)
    counts = rng.poisson(rates[labels] * rng.lognormal(0.0, 0.3, (300, 1)))
    X_all = normalize(sp.csr_matrix(counts.astype(np.float32)), "counts")  # normalised over ALL genes, as the sites do
    return X_all[:, :40], counts.sum(1).astype(np.float64), labels, counts[:, :40]


def test_library_stats_are_the_per_class_totals_and_plan_shares() -> None:
    X, library, labels, counts = _count_site(np.random.default_rng(0))
    stats = library_stats(X, library, labels, n_classes=3)
    for c in (0, 1):
        m = labels == c
        assert stats[c, 0] == pytest.approx(np.log(library[m]).mean(), rel=1e-5)
        assert stats[c, 1] == pytest.approx(np.log(library[m]).std(), rel=1e-4)
        assert stats[c, 2] == pytest.approx(
            (counts[m].sum(1) / library[m]).mean(), rel=1e-4
        )  # share recovered from X alone
    assert np.isnan(stats[2]).all() and stats.dtype == np.float32
    assert usable(stats, np.array([0, 1])) and not usable(stats, np.array([0, 2]))
    # a class of fewer than 5 cells gets the site's pooled row: no released number describes one or two cells
    few = np.concatenate([labels[:150], np.full(2, 2)]), np.concatenate([library[:150], library[150:152]])
    small = library_stats(sp.vstack([X[:150], X[150:152]]), few[1], few[0], n_classes=3)
    assert small[2, 0] == pytest.approx(np.log(few[1]).mean(), rel=1e-5) and small[0, 0] == pytest.approx(
        np.log(library[:150]).mean(), rel=1e-5
    )
    assert np.isnan(
        library_stats(X[:4], library[:4], labels[:4], n_classes=2)
    ).all()  # a site of 4 cells releases nothing


def test_sampled_counts_have_the_sites_library_sizes_and_the_real_cells_scale() -> None:
    torch.manual_seed(0)
    X, library, labels, _ = _count_site(np.random.default_rng(1))
    stats = library_stats(X, library, labels, n_classes=2)
    vae = VAE(VAEConfig(n_genes=40, latent_dim=4, hidden=(16, 8), count_head=True))
    z = np.random.default_rng(2).normal(size=(4000, 4)).astype(np.float32)
    y = np.repeat([0, 1], 2000)
    counts, X_syn = sample_counts(vae, z, y, stats, seed=3)
    assert (
        counts.shape == X_syn.shape == (4000, 40) and (counts >= 0).all() and np.array_equal(counts, np.round(counts))
    )
    for c in (0, 1):
        m = y == c
        share = plan_fraction(X_syn[m])  # X is log1p(counts / L * 1e4) with L the cell's total over ALL genes
        assert share.mean() == pytest.approx(stats[c, 2], rel=0.05)
        assert np.log(counts[m].sum(1) / stats[c, 2]).mean() == pytest.approx(stats[c, 0], abs=0.05)
    again, _ = sample_counts(vae, z, y, stats, seed=3)
    assert np.array_equal(counts, again)  # seeded
    with pytest.raises(ValueError, match="no count head"):
        sample_counts(VAE(VAEConfig(n_genes=40, latent_dim=4, hidden=(16, 8))), z, y, stats, seed=0)


def test_site_data_keeps_library_sizes_for_count_input_only() -> None:
    rng = np.random.default_rng(4)
    counts = rng.poisson(2.0, (60, 30)).astype(np.float32)
    obs = pd.DataFrame({"cell_type": np.repeat(["a", "b"], 30)}, index=[f"c{i}" for i in range(60)])
    adata = ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(30)]))
    site = prepare_site(adata, label_key="cell_type", vocabulary=[f"g{i}" for i in range(10)], min_coverage=0.1)
    assert np.array_equal(site.library, counts.sum(1))  # over all 30 genes, not the 10 kept
    back = counts_from_lognorm(torch.as_tensor(site.X.toarray()), torch.as_tensor(site.library, dtype=torch.float32))
    assert np.array_equal(back.numpy(), counts[:, :10])
    lognorm = adata.copy()
    lognorm.X = sp.csr_matrix(np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32))
    assert prepare_site(lognorm, label_key="cell_type").library is None
