"""The DP building blocks: the accountant against independent computations, calibration, clipping, noise secrets, the
ledger."""

from __future__ import annotations

import dataclasses
import math
import os
import stat

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.special import gammaln, logsumexp
from scipy.stats import norm

from shared.errors import ConfigError, ProtocolError
from shared.privacy import ledger
from shared.privacy import mechanisms as mech
from shared.privacy.accounting import (
    MAX_SGD_NOISE,
    ORDERS,
    PRIMARY,
    SUPPORT_SCALE,
    Noise,
    Schedule,
    SGDStage,
    calibrate,
    epsilon,
    release_noise,
    site_calibration,
    spend_rest,
)
from shared.privacy.sgd import DPSGD, clipped_sum, noisy_step_grads
from shared.privacy.spec import DPSpec


def _rdp_to_eps(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """Balle et al. 2020 (Prop. 12 of "Hypothesis testing interpretations and Renyi DP"), computed here by hand."""
    eps = rdp + np.log1p(-1 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    return float(np.min(eps))


def _sampled_gaussian_rdp(q: float, sigma: float, alpha: int) -> float:
    """Integer-order RDP of the Poisson-sampled Gaussian (Mironov, Talwar, Zhang 2019, Sec. 3.3), as a binomial sum."""
    k = np.arange(alpha + 1)
    log_binom = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
    with np.errstate(divide="ignore"):
        terms = log_binom + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
    return float(logsumexp(terms)) / (alpha - 1)


def test_one_gaussian_release_matches_its_closed_form() -> None:
    sigma, delta = 2.0, 1e-5
    orders = np.array(ORDERS, dtype=float)
    by_hand = _rdp_to_eps(orders / (2 * sigma**2), orders, delta)  # RDP of the Gaussian: alpha / (2 sigma^2)
    ours = epsilon(Schedule(("one release",)), Noise(sigma, 0.0), delta)
    assert ours == pytest.approx(by_hand, rel=1e-9)
    # and it is a valid, not too loose, bound on the exact privacy curve of the Gaussian mechanism (Balle & Wang 2018)
    exact = brentq(
        lambda e: norm.cdf(0.5 / sigma - e * sigma) - math.exp(e) * norm.cdf(-0.5 / sigma - e * sigma) - delta, 1e-6, 50
    )
    assert exact <= ours <= 1.35 * exact


def test_releases_with_different_noise_compose_as_one_gaussian() -> None:
    # Gaussian releases of noise s_1..s_n compose (RDP alpha / 2 sum 1/s_i^2) exactly as one Gaussian of noise
    # (sum 1/s_i^2)^-1/2: the class means at noise s and three others at SUPPORT_SCALE x s.
    sigma, delta = 0.84, 5e-5
    sched = DPSpec(8.0, None, 1.0, "r", class_means=True).schedule(2000.0, has_counts=True)
    assert sched.scale(PRIMARY) == 1.0 and sched.scale("label counts") == SUPPORT_SCALE and len(sched.one_shot) == 4
    equivalent = sigma / math.sqrt(1 + 3 / SUPPORT_SCALE**2)
    assert epsilon(sched, Noise(sigma, 0.0), delta) == pytest.approx(
        epsilon(Schedule(("one",)), Noise(equivalent, 0.0), delta), rel=1e-9
    )
    # calibration spends the target on the mix, and the class means get less noise than an even split would give them
    noise = calibrate(8.0, delta, sched)
    even = calibrate(8.0, delta, Schedule(sched.one_shot))
    assert epsilon(sched, noise, delta) == pytest.approx(epsilon(Schedule(sched.one_shot), even, delta), rel=0.01)
    assert noise.stats < 0.7 * even.stats and SUPPORT_SCALE * noise.stats > even.stats
    # with DP-SGD in the run every one-shot release gets the same noise
    sgd = DPSpec(8.0, None, 1.0, "r", 30, 100, 128, 50, 256, class_means=True).schedule(2000.0, has_counts=True)
    assert {sgd.scale(name) for name in sgd.one_shot} == {1.0}
    with pytest.raises(KeyError, match="latent moments"):
        sched.scale("latent moments")


def test_a_run_without_a_count_head_spends_nothing_on_library_statistics() -> None:
    """Statistics pretraining trains models with no count head, so nothing reads library statistics: the schedule
    leaves them out and the class means get the epsilon they would have cost (same target, same delta)."""
    cells = 300.0
    with_lib = DPSpec(8.0, None, 1.0, "r", class_means=True)
    without = dataclasses.replace(with_lib, library_stats=False)
    assert "library statistics" in with_lib.schedule(cells, has_counts=True).one_shot
    sched = without.schedule(cells, has_counts=True)
    assert "library statistics" not in sched.one_shot and sched == without.schedule(cells, has_counts=False)
    delta = with_lib.site_delta(cells)
    (s1, n1), (s0, n0) = (site_calibration(8.0, delta, s.schedule(cells, has_counts=True)) for s in (with_lib, without))
    assert epsilon(s0, n0, delta) == pytest.approx(8.0, rel=2e-3) == epsilon(s1, n1, delta)
    assert n0.stats * s0.scale(PRIMARY) < 0.97 * n1.stats * s1.scale(PRIMARY)  # 0.635 against 0.667 here
    assert n0.stats < 0.95 * n1.stats  # the profile and label counts gain too
    # the wire carries the choice
    assert DPSpec.from_items(without.items(), lambda r, k, t: t(r[k])) == without


@pytest.mark.parametrize("cells", [60.0, 270.0, 2500.0, 20_000.0, 100_000.0])
def test_the_class_means_spend_what_the_public_calibration_leaves(cells: float) -> None:
    """Without DP-SGD the one-shot noise is calibrated at the public DELTA_REF; the class means, released once the
    site's count is public, get the noise that makes the run spend the target at the site's own delta: less noise below
    10,000 cells, more above (where the public calibration alone overspends)."""
    spec = DPSpec(8.0, None, 1.0, "r", class_means=True)
    sched, delta = spec.schedule(cells, has_counts=True), spec.site_delta(cells)
    noise = calibrate(8.0, delta, sched)
    public = epsilon(sched, noise, delta)
    spent = spend_rest(8.0, delta, sched)
    # by hand: Gaussian releases compose as one of noise (sum 1/s_i^2)^-1/2, whose RDP at order a is a / (2 s^2)
    sigmas = np.array([noise.stats * spent.scale(name) for name in spent.one_shot])
    s_eq = float(np.sum(sigmas**-2.0) ** -0.5)
    orders = np.array(ORDERS, dtype=float)
    assert 0.995 * 8.0 <= _rdp_to_eps(orders / (2 * s_eq**2), orders, delta) <= 8.0 * (1 + 1e-6)
    for name in spent.one_shot:  # the releases made before the count keep their public noise
        if name != PRIMARY:
            assert spent.scale(name) == sched.scale(name)
            assert noise.stats * spent.scale(name) == pytest.approx(release_noise(8.0, sched, name))
    if cells < 10_000:
        assert public < 0.96 * 8.0 and spent.scale(PRIMARY) < sched.scale(PRIMARY)
    else:
        assert public > 8.0 and spent.scale(PRIMARY) > sched.scale(PRIMARY)


def test_with_dp_sgd_the_one_shot_noise_stays_public() -> None:
    sched = DPSpec(8.0, None, 1.0, "r", 30, 100, 128, 50, 256, class_means=True).schedule(2000.0, has_counts=True)
    assert spend_rest(8.0, 5e-5, sched) is sched  # DP-SGD's noise, calibrated at the site's delta, takes the rest


def test_dp_sgd_composition_matches_the_published_sampled_gaussian_rdp() -> None:
    # The MNIST configuration of Abadi et al. 2016 / TF Privacy: 60,000 examples, batch 256, noise 1.1, 60 epochs, delta
    # 1e-5.
    q, sigma, steps, delta = 256 / 60_000, 1.1, 60 * 60_000 // 256, 1e-5
    orders = np.array(ORDERS, dtype=float)
    rdp = np.array([steps * _sampled_gaussian_rdp(q, sigma, int(a)) for a in ORDERS])
    by_hand = _rdp_to_eps(rdp, orders, delta)
    ours = epsilon(Schedule((), (SGDStage("x", steps, q),)), Noise(0.0, sigma), delta)
    assert ours == pytest.approx(by_hand, rel=1e-6)
    classic = float(np.min(rdp + math.log(1 / delta) / (orders - 1)))  # Mironov 2017's conversion: valid, looser
    assert ours <= classic < 3.1


def test_calibration_meets_the_target_and_refuses_what_it_cannot() -> None:
    sched = DPSpec(8.0, None, 1.0, "r", 30, 100, 128, 50, 256).schedule(2000.0, has_counts=True)
    for target in (1.0, 8.0):
        noise = calibrate(target, 5e-5, sched)
        spent = epsilon(sched, noise, 5e-5)
        assert 0.98 * target <= spent <= target
    small = DPSpec(0.05, None, 1.0, "r", 30, 100, 128, 50, 256).schedule(150.0, has_counts=False)
    with pytest.raises(ConfigError, match=r"dp-epsilon=0.05 cannot be met: .*noise multiplier above") as err:
        calibrate(0.05, 1e-4, small)
    assert "\n" not in str(err.value) and str(MAX_SGD_NOISE).rstrip("0").rstrip(".") in str(err.value)


def test_spec_refuses_bad_settings() -> None:
    for bad in (DPSpec(-1.0), DPSpec(1.0, 0.5, 1.0, "r"), DPSpec(1.0, None, 0.0, "r"), DPSpec(1.0, None, 1.0, "")):
        with pytest.raises(ConfigError):
            bad.check()
    DPSpec().check()  # off
    assert DPSpec(1.0, run_key="r").site_delta(1000) == pytest.approx(1e-4)


def test_one_extreme_cell_moves_a_noisy_sum_by_at_most_one() -> None:
    rng = np.random.default_rng(0)
    V = rng.normal(size=(50, 8))
    labels = rng.integers(0, 3, 50)
    extreme = V.copy()
    extreme[7] *= 1e6
    a = mech.noisy_class_sums(V, labels, 3, 0.0, rng)
    b = mech.noisy_class_sums(extreme, labels, 3, 0.0, rng)
    assert np.linalg.norm(a - b) <= 2.0 + 1e-9  # both rows have norm <= 1 after clipping
    without = mech.noisy_class_sums(np.delete(V, 7, 0), np.delete(labels, 7), 3, 0.0, rng)
    assert np.linalg.norm(b - without) <= 1.0 + 1e-9


def test_dp_sgd_clips_each_cell_gradient() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
    x = torch.randn(20, 6)
    y = torch.randn(20, 1)
    loss = lambda m, xi, yi: ((m(xi) - yi) ** 2).sum()  # noqa: E731
    x_extreme = x.clone()
    x_extreme[3] *= 1e4
    y_extreme = y.clone()
    y_extreme[3] = 1e6
    base = clipped_sum(model, loss, (x, y), 0.5)
    moved = clipped_sum(model, loss, (x_extreme, y_extreme), 0.5)
    without = clipped_sum(model, loss, (torch.cat([x[:3], x[4:]]), torch.cat([y[:3], y[4:]])), 0.5)
    diff = lambda a, b: math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))  # noqa: E731
    assert diff(moved, without) <= 0.5 + 1e-5  # the extreme cell adds at most the clipping bound
    layered = clipped_sum(model, loss, (x_extreme, y_extreme), 0.5, per_layer=True)
    layered_without = clipped_sum(
        model, loss, (torch.cat([x[:3], x[4:]]), torch.cat([y[:3], y[4:]])), 0.5, per_layer=True
    )
    assert diff(layered, layered_without) <= 0.5 + 1e-5  # per layer too: every layer gets 0.5 / sqrt(3)
    assert diff(base, moved) <= 1.0 + 1e-5
    # the per-cell gradients agree with plain autograd on one cell
    one = clipped_sum(model, loss, (x[:1], y[:1]), 1e9)
    model.zero_grad()
    loss(model, x[:1], y[:1]).backward()
    assert all(torch.allclose(one[k], p.grad, atol=1e-5) for k, p in model.named_parameters())


def test_noisy_step_uses_the_secret_generator_and_the_expected_batch() -> None:
    model = torch.nn.Linear(3, 1)
    x, y = torch.zeros(0, 3), torch.zeros(0, 1)  # an empty Poisson draw: the gradient is noise only
    dp = DPSGD(noise_multiplier=2.0, max_grad_norm=0.5, sample_rate=0.1, expected_batch=10.0)
    noisy_step_grads(model, lambda m, xi, yi: ((m(xi) - yi) ** 2).sum(1), (x, y), dp, torch.Generator().manual_seed(1))
    first = model.weight.grad.clone()
    noisy_step_grads(model, lambda m, xi, yi: ((m(xi) - yi) ** 2).sum(1), (x, y), dp, torch.Generator().manual_seed(1))
    assert torch.equal(first, model.weight.grad)
    expected = (
        torch.randn((1, 3), generator=torch.Generator().manual_seed(1)) * 1.0 / 10.0
    )  # sigma * C / expected batch
    assert torch.allclose(first, expected)


def test_site_secret_is_private_stable_and_keys_the_noise(tmp_path) -> None:
    secret = mech.site_secret(tmp_path)
    assert len(secret) == mech.SECRET_BYTES and mech.site_secret(tmp_path) == secret
    assert stat.S_IMODE(os.stat(tmp_path / mech.SECRET_FILE).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [mech.SECRET_FILE]  # no second copy of it (a temp file) left behind
    a, b = mech.noise_rng(secret, ["run", "x"]).normal(size=3), mech.noise_rng(secret, ["run", "x"]).normal(size=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, mech.noise_rng(secret, ["run", "y"]).normal(size=3))
    assert not np.array_equal(a, mech.noise_rng(os.urandom(32), ["run", "x"]).normal(size=3))
    (tmp_path / mech.SECRET_FILE).write_bytes(b"short")
    with pytest.raises(Exception, match="damaged"):
        mech.site_secret(tmp_path)
    fresh = tmp_path / "not" / "there"  # a cache folder not made yet is made, private
    assert len(mech.site_secret(fresh)) == mech.SECRET_BYTES and stat.S_IMODE(fresh.stat().st_mode) == 0o700


def test_ledger_allows_a_retry_and_refuses_a_second_release(tmp_path) -> None:
    ledger.claim(tmp_path, "site", "run-1", "vae-1", "aaa")
    ledger.claim(tmp_path, "site", "run-1", "vae-1", "aaa")  # the same request again: same noise, nothing new
    with pytest.raises(ProtocolError, match="already released"):
        ledger.claim(tmp_path, "site", "run-1", "vae-1", "bbb")
    ledger.claim(tmp_path, "site", "run-2", "vae-1", "bbb")  # another run is another budget
    ledger.claim(tmp_path, "other-site", "run-1", "vae-1", "bbb")


def test_label_names_pass_the_threshold_rarely() -> None:
    sigma, delta = 4.0, 1e-6
    tau = mech.name_threshold(sigma, delta)
    assert norm.sf((tau - 1) / sigma) == pytest.approx(delta, rel=1e-6)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("max_norm", [0.05, 1e6])  # most cells clipped / none clipped
def test_ghost_clipping_equals_clipping_materialised_per_cell_gradients(max_norm: float, per_layer: bool) -> None:
    from shared.models import SCDG, VAE, SCDGConfig, VAEConfig
    from shared.models.vae import counts_from_lognorm
    from shared.privacy.ghost import ghost_clipped_sum, leftover_parameters
    from shared.privacy.sgd import per_cell_grads

    torch.manual_seed(0)
    vae = VAE(VAEConfig(n_genes=30, latent_dim=6, hidden=(16, 8), n_classes=3, count_head=True)).eval()
    x = torch.rand(12, 30) * 3
    y = torch.randint(0, 3, (12,))
    lib = torch.full((12,), 2000.0)

    def vae_losses(
        m: VAE, xi: torch.Tensor, yi: torch.Tensor, li: torch.Tensor
    ) -> torch.Tensor:  # deterministic; the encoder runs twice
        mu = m.encode(xi)[0]
        again = m.encode(xi * 0.5)[0]
        counts = counts_from_lognorm(xi, li)
        return (
            ((m.decode(mu) - xi) ** 2).sum(1)
            + torch.nn.functional.cross_entropy(m.label_head(again), yi, reduction="none")
            - m.count_head.log_prob(mu.detach(), counts, exact=False)
        )

    assert leftover_parameters(vae) == ["count_head.log_theta"]
    rows = (x, y, lib)
    ghost = ghost_clipped_sum(
        vae,
        vae_losses,
        rows,
        max_norm,
        lambda names: per_cell_grads(vae, lambda m, *r: vae_losses(m, *r)[0], rows, names),
        per_layer=per_layer,
    )
    assert _close(ghost, clipped_sum(vae, lambda m, *r: vae_losses(m, *r)[0], rows, max_norm, per_layer=per_layer))

    scdg = SCDG(SCDGConfig(latent_dim=6, n_classes=3, hidden=16)).eval()
    torch.nn.init.normal_(
        scdg.out[1].weight, std=0.1
    )  # the output layer starts at zero: give it gradients through the blocks
    z = torch.randn(12, 6)
    t = torch.randint(0, 1000, (12,))

    def scdg_losses(
        m: SCDG, zi: torch.Tensor, ci: torch.Tensor, ti: torch.Tensor
    ) -> torch.Tensor:  # embedding, time MLP, the QA head twice
        ce = torch.nn.functional.cross_entropy
        return (
            (m.eps(zi, ti, ci, dedupe=False) ** 2).sum(1)
            + ce(m.classify(zi), ci, reduction="none")
            + ce(m.classify(zi * 0.3), ci, reduction="none")
        )

    rows = (z, y, t)
    assert _close(
        ghost_clipped_sum(scdg, scdg_losses, rows, max_norm, per_layer=per_layer),
        clipped_sum(scdg, lambda m, *r: scdg_losses(m, *r)[0], rows, max_norm, per_layer=per_layer),
    )
