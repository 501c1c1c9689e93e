"""Models: shapes, schedule maths, single-step gradients, checkpoint round-trip."""

from __future__ import annotations

import math

import pytest
import torch

from shared.checkpoint import load_model, model_hash, save_model
from shared.errors import CheckpointError
from shared.models import SCDG, VAE, MLPClassifier, MLPConfig, SCDGConfig, VAEConfig
from shared.models.scdg import cosine_alpha_bar
from shared.models.vae import CELL_VAR_RATIO, LOG_MAX


def test_cosine_schedule_is_monotone_from_one_to_zero() -> None:
    ab = cosine_alpha_bar(1000)
    assert ab.shape == (1000,)
    assert float(ab[0]) == pytest.approx(1.0, abs=1e-3)
    assert float(ab[-1]) < 1e-3
    assert bool((ab[1:] <= ab[:-1]).all())
    # closed form of the cosine schedule at the midpoint (s = 0.008)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert float(ab[499]) == pytest.approx(f(500) / f(0), rel=2e-2)


def test_one_step_inverts_forward_noise_given_the_true_noise() -> None:
    torch.manual_seed(0)
    g = SCDG(SCDGConfig(latent_dim=8, n_classes=3))
    z0 = torch.randn(5, 8)
    noise = torch.randn(5, 8)
    t = torch.full((5,), 300)
    z_t = g.q_sample(z0, t, noise)
    ab = g.alpha_bar[300]
    recovered = (z_t - (1 - ab).sqrt() * noise) / ab.sqrt()
    assert torch.allclose(recovered, z0, atol=1e-5)


def test_single_step_gradient_reaches_the_codes() -> None:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(n_genes=30, latent_dim=8, hidden=(16,)))
    g = SCDG(SCDGConfig(latent_dim=8, n_classes=3))
    torch.nn.init.normal_(g.out[1].weight, std=0.1)  # a trained-like denoiser (zero-init would be identity)
    w = torch.randn(6, 8, requires_grad=True)
    c = torch.tensor([0, 0, 1, 1, 2, 2])
    cells = vae.decode(g.unstandardize(g.one_step(w, 400, c, guidance=2.0)))
    cells.sum().backward()
    assert w.grad is not None
    assert torch.isfinite(w.grad).all()
    assert float(w.grad.abs().sum()) > 0
    assert cells.shape == (6, 30)


def test_guidance_zero_equals_conditional_prediction() -> None:
    torch.manual_seed(0)
    g = SCDG(SCDGConfig(latent_dim=4, n_classes=2))
    torch.nn.init.normal_(g.out[1].weight, std=0.5)
    z = torch.randn(3, 4)
    t = torch.full((3,), 100)
    c = torch.tensor([0, 1, 1])
    assert torch.allclose(g.guided_eps(z, t, c, 0.0), g.eps(z, t, c))
    assert not torch.allclose(g.guided_eps(z, t, c, 2.0), g.eps(z, t, c))


def test_vae_decodes_non_negative_and_sparse_mode_has_zeros() -> None:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(n_genes=50, latent_dim=4, hidden=(16,)))
    z = torch.randn(10, 4)
    dense, sparse = vae.decode(z, "expected"), vae.decode(z, "sparse")
    assert (dense >= 0).all() and (sparse >= 0).all()
    assert (sparse == 0).float().mean() > 0.1


def test_gaussian_decoding_draws_the_public_cell_model_around_the_expected_expression() -> None:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(n_genes=40, latent_dim=4, hidden=(16,))).eval()  # no dropout: one expected profile
    with torch.no_grad():  # expected values of about 1-3, away from the clip at 0
        vae.to_mean.bias.fill_(2.0)
        vae.to_logit.bias.fill_(4.0)
    z = torch.randn(1, 4).repeat(4000, 1)  # one latent, drawn 4000 times
    expected = vae.decode(z[:1], "expected")[0]
    draws = vae.decode(z, "gaussian", generator=torch.Generator().manual_seed(1))
    assert (draws >= 0).all() and (draws <= LOG_MAX).all()
    assert torch.allclose(draws.mean(0), expected, atol=0.06)
    assert torch.allclose(draws.var(0) / expected, torch.full_like(expected, CELL_VAR_RATIO), atol=0.06)
    again = vae.decode(z, "gaussian", generator=torch.Generator().manual_seed(1))
    other = vae.decode(z, "gaussian", generator=torch.Generator().manual_seed(2))
    assert torch.equal(draws, again) and not torch.equal(draws, other)
    with pytest.raises(ValueError, match="unknown decode mode 'poisson'"):
        vae.decode(z, "poisson")  # type: ignore[arg-type]


def test_vae_loss_terms_are_finite_and_label_head_trains() -> None:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(n_genes=20, latent_dim=4, hidden=(16,), n_classes=2, n_aux=3))
    x = torch.rand(8, 20) * (torch.rand(8, 20) > 0.5)
    out = vae.loss(x, torch.tensor([0, 1] * 4), torch.randn(8, 3))
    for term in (out.total, out.recon, out.kl, out.label, out.aux):
        assert torch.isfinite(term)
    assert out.label.item() > 0 and out.aux.item() > 0


@pytest.mark.parametrize(
    "model",
    [
        VAE(VAEConfig(n_genes=12, latent_dim=3, hidden=(8, 4), n_classes=2)),
        SCDG(SCDGConfig(latent_dim=3, n_classes=2, hidden=16, n_blocks=1)),
        MLPClassifier(MLPConfig(n_genes=12, n_classes=2)),
    ],
)
def test_checkpoint_round_trip_keeps_config_and_weights(model: torch.nn.Module, tmp_path) -> None:
    path = save_model(model, tmp_path / "m.pt")
    loaded = load_model(path)
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    assert model_hash(loaded) == model_hash(model)


def test_checkpoint_refuses_wrong_kind_and_garbage(tmp_path) -> None:
    path = save_model(MLPClassifier(MLPConfig(n_genes=4, n_classes=2)), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="expected 'vae'"):
        load_model(path, kind="vae")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a fedscdd checkpoint"):
        load_model(bad)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_model(tmp_path / "missing.pt")


def test_model_hash_changes_with_weights() -> None:
    m = MLPClassifier(MLPConfig(n_genes=4, n_classes=2))
    h = model_hash(m)
    with torch.no_grad():
        next(m.parameters()).add_(1.0)
    assert model_hash(m) != h
    assert len(h) == 16 and all(ch in "0123456789abcdef" for ch in h)


def test_sample_mode_is_seeded_and_cell_like() -> None:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(n_genes=200, latent_dim=4, hidden=(16,))).eval()
    z = torch.randn(20, 4)
    a = vae.decode(z, "sample", generator=torch.Generator().manual_seed(1))
    b = vae.decode(z, "sample", generator=torch.Generator().manual_seed(1))
    c = vae.decode(z, "sample", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    mean, logit = vae.decode_parts(z)
    zero_frac = float((a == 0).float().mean())
    expected_zero = float((1 - torch.sigmoid(logit)).mean())
    assert abs(zero_frac - expected_zero) < 0.05
    assert torch.all((a == 0) | torch.isclose(a, mean))


def test_site_vector_conditions_encoder_and_decoder_and_as_site_restores_it() -> None:
    torch.manual_seed(0)
    plain = VAE(VAEConfig(n_genes=30, latent_dim=4))
    assert plain.site_embedding is None and "site_embedding" not in plain.state_dict()
    vae = VAE(VAEConfig(n_genes=30, latent_dim=4, site_dim=3)).eval()
    assert vae.state_dict()["site_embedding"].shape == (3,)
    x, z = torch.rand(5, 30), torch.randn(5, 4)
    own = (vae.encode(x)[0].detach(), vae.decode(z).detach())
    other = torch.ones(3).numpy()
    with vae.as_site(other) as v:
        assert torch.equal(v.site_embedding.detach(), torch.ones(3))  # type: ignore[union-attr]
        assert not torch.allclose(v.encode(x)[0], own[0]) and not torch.allclose(v.decode(z), own[1])
    assert torch.equal(vae.site_embedding.detach(), torch.zeros(3))  # type: ignore[union-attr]
    with pytest.raises(RuntimeError), vae.as_site(other):
        raise RuntimeError  # restored on the way out of a failure too
    assert torch.equal(vae.site_embedding.detach(), torch.zeros(3))  # type: ignore[union-attr]
    with vae.as_site(None) as v:
        assert torch.equal(v.decode(z), own[1])
    loss = vae.loss(x).total
    loss.backward()
    assert vae.site_embedding.grad is not None and vae.site_embedding.grad.abs().sum() > 0  # type: ignore[union-attr]
