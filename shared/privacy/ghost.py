"""Per-cell gradient clipping without per-cell gradients ("ghost clipping", Goodfellow 2015; Li et al. 2022).

For a linear layer used once, a cell's weight gradient is the outer product of the output gradient
g_i and the input a_i, so its squared norm is ||g_i||^2 ||a_i||^2, and the sum of clipped gradients
is (s * g)^T a: one forward and one backward (to the layer outputs) give every cell's gradient norm
and the clipped sum, at about twice the cost of a plain step. Layers used more than once per cell
(the SCDG's quality classifier) use the Gram form sum_uv (g_u . g_v)(a_u . a_v). LayerNorm and
Embedding gradients are small and are formed per cell. Any other parameter (the count head's
dispersion) gets its per-cell gradients from ``torch.func`` (``shared.privacy.sgd``). The result is
the same clipped sum as clipping materialised per-cell gradients (tested against it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

GHOST_TYPES = (nn.Linear, nn.LayerNorm, nn.Embedding)


@dataclass
class _Uses:
    """The inputs and outputs of one module in one forward pass (one entry per call)."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)


def _trainable(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters(recurse=False))


def ghost_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose parameters ghost clipping covers (by name)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, GHOST_TYPES) and _trainable(m)}


def leftover_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters ghost clipping does not cover."""
    covered = {
        f"{name}.{p}" if name else p
        for name, m in ghost_modules(model).items()
        for p, _ in m.named_parameters(recurse=False)
    }
    return [k for k, p in model.named_parameters() if p.requires_grad and k not in covered]


def _record(
    model: nn.Module, losses_fn: Callable[..., torch.Tensor], rows: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, dict[str, _Uses]]:
    uses = {name: _Uses() for name in ghost_modules(model)}
    handles = []
    for name, m in ghost_modules(model).items():

        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor, name: str = name) -> None:
            uses[name].inputs.append(args[0].detach())
            uses[name].outputs.append(out)

        handles.append(m.register_forward_hook(hook))
    try:
        losses = losses_fn(model, *rows)
    finally:
        for h in handles:
            h.remove()
    return losses, uses


def _layer_norm_input(m: nn.LayerNorm, a: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(a, m.normalized_shape, eps=m.eps)


def _sum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum(terms)`` (0 + t1 + t2 + ...), typed for a non-empty run of tensors."""
    return cast(torch.Tensor, sum(terms))


def _pairwise(vecs: list[torch.Tensor]) -> torch.Tensor:
    """Per row, sum over u, v of <vecs[u]_i, vecs[v]_i>: the squared norm of the row sum, without forming it when there
    is one use."""
    if len(vecs) == 1:
        return vecs[0].pow(2).sum(1)
    return torch.stack(vecs).sum(0).pow(2).sum(1)


Group = tuple[torch.Tensor, Callable[[torch.Tensor], dict[str, torch.Tensor]]]  # per-cell squared norms, clipped sums


Tensors = list[torch.Tensor]
Sums = Callable[[torch.Tensor], dict[str, torch.Tensor]]  # clip scales (n,) -> the module's clipped gradient sums


def _linear_sums(m: nn.Linear, a_list: Tensors, g_list: Tensors, prefix: str) -> Sums:
    def sums(s: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}weight": _sum((s[:, None] * g).T @ a for g, a in zip(g_list, a_list, strict=True)),
            **({f"{prefix}bias": _sum((s[:, None] * g).sum(0) for g in g_list)} if m.bias is not None else {}),
        }

    return sums


def _layer_norm_sums(m: nn.LayerNorm, w_cell: torch.Tensor, b_cell: torch.Tensor, prefix: str) -> Sums:
    def sums(s: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            **({f"{prefix}weight": (s[:, None] * w_cell).sum(0)} if m.weight is not None else {}),
            **({f"{prefix}bias": (s[:, None] * b_cell).sum(0)} if m.bias is not None else {}),
        }

    return sums


def _embedding_sums(m: nn.Embedding, a_list: Tensors, g_list: Tensors, prefix: str) -> Sums:
    def sums(s: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}weight": _sum(
                torch.zeros_like(m.weight).index_add_(0, a, s[:, None] * g) for a, g in zip(a_list, g_list, strict=True)
            )
        }

    return sums


def _groups(model: nn.Module, uses: dict[str, _Uses], grads: dict[str, list[torch.Tensor]], n: int) -> list[Group]:
    """Per module: each cell's squared gradient norm over the module's parameters, and its clipped sums given the clip
    scales."""
    out: list[Group] = []
    for name, m in ghost_modules(model).items():
        a_list, g_list = uses[name].inputs, grads[name]
        if not a_list:
            continue
        sq = torch.zeros(n)
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.Linear):
            if any(a.dim() != 2 or a.shape[0] != n for a in a_list):
                msg = f"ghost clipping needs one row per cell at every linear layer ({name})"
                raise ValueError(msg)
            if len(a_list) == 1:
                sq += g_list[0].pow(2).sum(1) * a_list[0].pow(2).sum(1)
            else:
                for u in range(len(a_list)):
                    for v in range(len(a_list)):
                        sq += (g_list[u] * g_list[v]).sum(1) * (a_list[u] * a_list[v]).sum(1)
            if m.bias is not None:
                sq += _pairwise(g_list)

            out.append((sq, _linear_sums(m, a_list, g_list, prefix)))
        elif isinstance(m, nn.LayerNorm):
            w_cell = _sum(g * _layer_norm_input(m, a) for g, a in zip(g_list, a_list, strict=True))
            b_cell = _sum(g_list)
            if m.weight is not None:
                sq += w_cell.pow(2).sum(1)
            if m.bias is not None:
                sq += b_cell.pow(2).sum(1)

            out.append((sq, _layer_norm_sums(m, w_cell, b_cell, prefix)))
        else:  # nn.Embedding: a cell's gradient is g on the rows it looked up
            emb = cast(nn.Embedding, m)  # the one GHOST_TYPES left
            for u in range(len(a_list)):
                for v in range(len(a_list)):
                    sq += (a_list[u] == a_list[v]).float() * (g_list[u] * g_list[v]).sum(1)

            out.append((sq, _embedding_sums(emb, a_list, g_list, prefix)))
    return out


def n_groups(model: nn.Module) -> int:
    """Clipping groups of a model under per-layer clipping: its ghost modules and each leftover parameter (fixed by the
    model, not the data)."""
    return len(ghost_modules(model)) + len(leftover_parameters(model))


def scales(groups: list[torch.Tensor], max_norm: float, n_total: int, *, per_layer: bool) -> list[torch.Tensor]:
    """Clip scales (n,) per group: flat clipping bounds each cell's whole gradient by max_norm; per-layer clipping
    bounds each of the ``n_total`` groups by max_norm / sqrt(n_total) (McMahan et al. 2018), so a small layer's signal
    is not lost in a large one's norm. Either way a cell's clipped gradient has norm <= max_norm."""
    if not per_layer:
        total = torch.stack(groups).sum(0) if groups else torch.zeros(0)
        one = (max_norm / total.sqrt().clamp_min(1e-12)).clamp(max=1.0)
        return [one] * len(groups)
    bound = max_norm / max(n_total, 1) ** 0.5
    return [(bound / g.sqrt().clamp_min(1e-12)).clamp(max=1.0) for g in groups]


def ghost_clipped_sum(
    model: nn.Module,
    losses_fn: Callable[..., torch.Tensor],
    rows: tuple[torch.Tensor, ...],
    max_norm: float,
    leftover: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
    *,
    per_layer: bool = False,
) -> dict[str, torch.Tensor]:
    """Sum over cells of each cell's gradient clipped to L2 norm ``max_norm`` (per layer: see ``scales``).

    ``losses_fn(model, *rows)`` returns each cell's own loss (n,) (row i depends on cell i only).
    ``leftover(names)`` returns per-cell gradients (n, ...) of the parameters ghost clipping does not
    cover (required when there are any).
    """
    n = rows[0].shape[0] if rows else 0
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    if n == 0:
        return total
    losses, uses = _record(model, losses_fn, rows)
    outs = [(name, i, o) for name, u in uses.items() for i, o in enumerate(u.outputs)]
    got = torch.autograd.grad(losses.sum(), [o for _, _, o in outs], allow_unused=True)
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in uses}
    for (name, _, o), g in zip(outs, got, strict=True):
        grads[name].append(torch.zeros_like(o) if g is None else g.detach())
    groups = _groups(model, uses, grads, n)
    rest = leftover_parameters(model)
    if rest:
        if leftover is None:
            msg = f"parameters {rest} are not covered by ghost clipping: pass their per-cell gradients (leftover)"
            raise ValueError(msg)
        for k, v in leftover(rest).items():

            def leftover_sums(s: torch.Tensor, k: str = k, v: torch.Tensor = v) -> dict[str, torch.Tensor]:
                return {k: torch.tensordot(s, v, dims=1)}

            groups.append((v.flatten(1).pow(2).sum(1), leftover_sums))
    for (_, apply), s in zip(
        groups, scales([g for g, _ in groups], max_norm, n_groups(model), per_layer=per_layer), strict=True
    ):
        for k, v in apply(s).items():
            total[k] += v
    return total
