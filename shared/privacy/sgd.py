"""DP-SGD (Abadi et al. 2016) for the VAE and the SCDG: Poisson-sampled cells, each cell's gradient clipped, Gaussian noise.

Why not opacus: its per-sample gradients come from module hooks that assume every layer sees the
batch as its first dimension, which the SCDG breaks on purpose (it computes its conditioning once
per distinct (t, class) pair and gathers it); opacus would also replace our training loops. Per-cell
gradients here come from ``torch.func`` (vmap of grad over single-cell losses), in chunks so memory
stays at CHUNK copies of the gradient. Accounting is ``shared.privacy.accounting`` (dp-accounting).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

CHUNK = 32  # cells whose gradients are held at once


@dataclass(frozen=True)
class DPSGD:
    """One stage's DP-SGD settings at one site."""

    noise_multiplier: float  # noise std / max_grad_norm
    max_grad_norm: float  # L2 bound of one cell's gradient
    sample_rate: float  # each cell joins a step's batch with this probability (Poisson sampling)
    expected_batch: float  # sample_rate x the site's (noised) cell count: the noisy sum is divided by it


class _Method(nn.Module):
    """A model with ``forward`` = ``fn(model, *args)``, so ``functional_call`` can run any of its loss methods."""

    def __init__(self, model: nn.Module, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(self.model, *args)


def poisson_batch(n: int, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Indices of the cells drawn into one step: each independently with probability ``rate``."""
    return torch.nonzero(torch.rand(n, generator=gen) < rate).flatten()


def clipped_sum(model: nn.Module, loss: Callable[..., torch.Tensor], rows: tuple[torch.Tensor, ...], max_norm: float) -> dict[str, torch.Tensor]:
    """Sum over cells of each cell's gradient clipped to L2 norm ``max_norm`` (all trainable parameters together).

    ``loss(model, *one_cell_rows)`` is the loss of ONE cell; each tensor in ``rows`` has the cells
    along dimension 0 and is given to ``loss`` with a leading dimension of 1.
    """
    wrapper = _Method(model, loss)
    params = {f"model.{k}": p.detach() for k, p in model.named_parameters() if p.requires_grad}

    def one(p: dict[str, torch.Tensor], *row: torch.Tensor) -> torch.Tensor:
        return functional_call(wrapper, p, tuple(r.unsqueeze(0) for r in row))

    per_cell = vmap(grad(one), in_dims=(None, *(0,) * len(rows)), randomness="different")
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    n = rows[0].shape[0] if rows else 0
    for start in range(0, n, CHUNK):
        g = per_cell(params, *(r[start:start + CHUNK] for r in rows))
        norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
        scale = (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
        for k, v in g.items():
            total[k] += torch.tensordot(scale, v, dims=1)
    return {k.removeprefix("model."): v for k, v in total.items()}


def noisy_step_grads(model: nn.Module, loss: Callable[..., torch.Tensor], rows: tuple[torch.Tensor, ...], dp: DPSGD, gen: torch.Generator) -> None:
    """Set every trainable parameter's ``.grad`` to (clipped sum + N(0, (sigma C)^2)) / expected batch: one DP-SGD step's gradient."""
    summed = clipped_sum(model, loss, rows, dp.max_grad_norm)
    std = dp.noise_multiplier * dp.max_grad_norm
    for k, p in model.named_parameters():
        if p.requires_grad:
            noise = torch.randn(p.shape, generator=gen) * std
            p.grad = (summed[k] + noise) / max(dp.expected_batch, 1.0)
