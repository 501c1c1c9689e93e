"""SCAFFOLD's gradient correction at a site (shared.drift)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from server.synthesis import fresh_models
from shared.drift import GradientShift, zero_controls
from shared.fitting import TrainConfig, fit_scdg
from shared.protocol import Plan, SiteSpec


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1))


def _loss(model: torch.nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g)
    return ((model(x) - y) ** 2).mean()


def _controls(model: torch.nn.Module, value: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (value * rng.normal(size=v.shape)).astype(np.float32) for k, v in zero_controls(model).items()}


def test_the_shift_adds_server_minus_site_and_the_new_variate_is_the_mean_raw_gradient() -> None:
    model = _model()
    server, local = _controls(model, 1.0, 1), _controls(model, 1.0, 2)
    shift = GradientShift(model, server, local)
    raw = {k: np.zeros_like(v) for k, v in server.items()}
    for seed in range(3):
        model.zero_grad()
        _loss(model, seed).backward()
        grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
        for k in raw:
            raw[k] += grads[k] / 3
        shift.apply()
        for k, p in model.named_parameters():
            np.testing.assert_allclose(p.grad.numpy(), grads[k] + server[k] - local[k], rtol=1e-6, atol=1e-7)
    mean = shift.mean_gradient()
    assert set(mean) == set(raw)
    for k in raw:
        np.testing.assert_allclose(mean[k], raw[k], rtol=1e-5, atol=1e-7)


def test_with_plain_sgd_the_mean_gradient_is_scaffolds_option_two() -> None:
    """Karimireddy et al. (2020), eq. (4) option II: c_i+ = c_i - c + (x - y_i) / (K lr)."""
    model, lr, steps = _model(), 0.05, 4
    server, local = _controls(model, 0.3, 3), _controls(model, 0.3, 4)
    start = {k: p.detach().clone().numpy() for k, p in model.named_parameters()}
    shift = GradientShift(model, server, local)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for seed in range(steps):
        opt.zero_grad()
        _loss(model, seed).backward()
        shift.apply()
        opt.step()
    end = {k: p.detach().numpy() for k, p in model.named_parameters()}
    for k, c_new in shift.mean_gradient().items():
        option_two = local[k] - server[k] + (start[k] - end[k]) / (steps * lr)
        np.testing.assert_allclose(c_new, option_two, rtol=1e-4, atol=1e-5)


def test_variates_that_do_not_fit_the_model_are_refused() -> None:
    model = _model()
    zeros = zero_controls(model)
    with pytest.raises(ValueError, match="missing"):
        GradientShift(model, {k: v for k, v in list(zeros.items())[1:]}, zeros)
    wrong = {**zeros, "0.bias": np.zeros(5, np.float32)}
    with pytest.raises(ValueError, match="shape"):
        GradientShift(model, zeros, wrong)


def test_a_zero_shift_trains_exactly_as_without_one_and_a_shift_moves_the_weights() -> None:
    rng = np.random.default_rng(0)
    Z, y = rng.normal(size=(60, 8)).astype(np.float32), rng.integers(0, 3, 60)
    plan = Plan(tuple(f"g{i}" for i in range(20)), ("a", "b", "c"), SiteSpec(label_key="cell_type", split_seed=0))
    _, scdg = fresh_models(plan, latent_dim=8, seed=0)
    runs = {}
    for name in ("plain", "zero", "shifted"):
        model = copy.deepcopy(scdg)
        zeros = zero_controls(model)
        shift = {
            "plain": None,
            "zero": GradientShift(model, zeros, zeros),
            "shifted": GradientShift(model, _controls(model, 0.01, 5), zeros),
        }[name]
        fit_scdg(model, Z, y, TrainConfig(steps=5, seed=1), shift=shift)
        runs[name] = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        if shift is not None:
            assert shift.steps == 5 and any(np.any(v) for v in shift.mean_gradient().values())
    assert all(np.array_equal(runs["plain"][k], runs["zero"][k]) for k in runs["plain"])
    assert any(not np.array_equal(runs["plain"][k], runs["shifted"][k]) for k in runs["plain"])
