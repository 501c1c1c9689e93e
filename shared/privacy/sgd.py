"""DP-SGD (Abadi et al. 2016) for the VAE and the SCDG: Poisson-sampled cells, each cell's gradient clipped, Gaussian
noise.

Why not opacus: its hooks assume every layer sees the batch as its first dimension, which the
SCDG's default forward breaks on purpose (conditioning computed once per distinct (t, class) pair),
its per-sample gradients materialise a copy of the model per cell (19x a plain step here), and it
would replace our training loops. A step here clips with ``shared.privacy.ghost`` (per-cell norms
without per-cell gradients); ``clipped_sum`` (torch.func, materialised per-cell gradients, in chunks)
is the reference it is tested against. Accounting is ``shared.privacy.accounting`` (dp-accounting).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

# cells whose gradients are held at once (on CPU 8 was fastest: 0.51 s per VAE step of 128 cells on 2,000 genes;
# 32: 1.1 s)
CHUNK = 8


@dataclass(frozen=True)
class DPSGD:
    """One stage's DP-SGD settings at one site."""

    noise_multiplier: float  # noise std / max_grad_norm
    max_grad_norm: float  # L2 bound of one cell's gradient
    sample_rate: float  # each cell joins a step's batch with this probability (Poisson sampling)
    expected_batch: float  # sample_rate x the site's (noised) cell count: the noisy sum is divided by it
    per_layer: bool = True  # clip each layer to max_grad_norm / sqrt(layers) (shared.privacy.ghost.scales)


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


def clipped_sum(
    model: nn.Module,
    loss: Callable[..., torch.Tensor],
    rows: tuple[torch.Tensor, ...],
    max_norm: float,
    *,
    per_layer: bool = False,
) -> dict[str, torch.Tensor]:
    """Sum over cells of each cell's gradient clipped to L2 norm ``max_norm`` (all trainable parameters together, or per
    layer: the parameters of one module, as ``shared.privacy.ghost.scales``), from materialised per-cell gradients.

    ``loss(model, *one_cell_rows)`` is the loss of ONE cell; each tensor in ``rows`` has the cells
    along dimension 0 and is given to ``loss`` with a leading dimension of 1.
    """
    from shared.privacy.ghost import n_groups, scales

    wrapper = _Method(model, loss)
    params = {f"model.{k}": p.detach() for k, p in model.named_parameters() if p.requires_grad}
    owners = sorted({k.rsplit(".", 1)[0] for k in params})

    def one(p: dict[str, torch.Tensor], *row: torch.Tensor) -> torch.Tensor:
        return functional_call(wrapper, p, tuple(r.unsqueeze(0) for r in row))

    per_cell = vmap(grad(one), in_dims=(None, *(0,) * len(rows)), randomness="different")
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    n = rows[0].shape[0] if rows else 0
    for start in range(0, n, CHUNK):
        g = per_cell(params, *(r[start : start + CHUNK] for r in rows))
        sq = [sum(v.flatten(1).pow(2).sum(1) for k, v in g.items() if k.rsplit(".", 1)[0] == o) for o in owners]
        for o, s in zip(owners, scales(sq, max_norm, n_groups(model), per_layer=per_layer), strict=True):
            for k, v in g.items():
                if k.rsplit(".", 1)[0] == o:
                    total[k] += torch.tensordot(s, v, dims=1)
    return {k.removeprefix("model."): v for k, v in total.items()}


def per_cell_grads(
    model: nn.Module, loss: Callable[..., torch.Tensor], rows: tuple[torch.Tensor, ...], names: list[str]
) -> dict[str, torch.Tensor]:
    """Per-cell gradients (n, ...) of the parameters ``names`` only (``loss`` as in ``clipped_sum``), the rest held
    fixed."""
    wrapper = _Method(model, loss)
    params = {f"model.{k}": p.detach() for k, p in model.named_parameters() if k in names}

    def one(p: dict[str, torch.Tensor], *row: torch.Tensor) -> torch.Tensor:
        return functional_call(wrapper, p, tuple(r.unsqueeze(0) for r in row))

    g = vmap(grad(one), in_dims=(None, *(0,) * len(rows)), randomness="different")(params, *rows)
    return {k.removeprefix("model."): v for k, v in g.items()}


def noisy_step_grads(
    model: nn.Module,
    losses: Callable[..., torch.Tensor],
    rows: tuple[torch.Tensor, ...],
    dp: DPSGD,
    gen: torch.Generator,
) -> None:
    """Set every trainable parameter's ``.grad`` to (clipped sum + N(0, (sigma C)^2)) / expected batch: one DP-SGD
    step's gradient.

    ``losses(model, *rows)`` returns each cell's own loss (n,); the clipped sum comes from ghost
    clipping (``shared.privacy.ghost``), parameters it does not cover from ``per_cell_grads``.
    """
    from shared.privacy.ghost import ghost_clipped_sum

    def leftover(names: list[str]) -> dict[str, torch.Tensor]:
        return per_cell_grads(model, lambda m, *r: losses(m, *r)[0], rows, names)

    summed = ghost_clipped_sum(model, losses, rows, dp.max_grad_norm, leftover, per_layer=dp.per_layer)
    std = dp.noise_multiplier * dp.max_grad_norm
    for k, p in model.named_parameters():
        if p.requires_grad:
            noise = torch.randn(p.shape, generator=gen) * std
            p.grad = (summed[k] + noise) / max(dp.expected_batch, 1.0)
