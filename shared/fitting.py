"""Training loops for the latent VAE and the SCDG (plain functions, usable in FedAvg rounds)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import numpy as np
import scipy.sparse as sp
import torch

from shared.drift import GradientShift
from shared.models import SCDG, VAE
from shared.privacy.sgd import DPSGD, noisy_step_grads, poisson_batch

logger = logging.getLogger(__name__)

Matrix: TypeAlias = sp.csr_matrix | np.ndarray
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation budget of one training call (steps, not epochs: time does not grow with n)."""

    steps: int = 2000
    lr: float = 1e-3
    batch_size: int = 256
    weight_decay: float = 1e-5
    seed: int = 0
    warmup_fraction: float = 0.3  # KL warm-up for the VAE


@dataclass
class AdamCarry:
    """AdamW moments carried from one training call to the next (a site keeps them across its FedAvg rounds).

    ``state`` is an ``optimizer.state_dict()`` (None: start fresh). A call loads it when given and replaces it with
    the state after its steps; the moments then keep their history (and Adam's bias correction its step count)
    instead of restarting at every round, which makes each round's first steps sign-like steps of size ``lr``.
    """

    state: dict[str, Any] | None = None


def _adamw(model: torch.nn.Module, cfg: TrainConfig, carry: AdamCarry | None) -> torch.optim.Optimizer:
    """AdamW over the model's parameters, continuing ``carry``'s moments when it holds any."""
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True
    )  # fused: ~15% faster steps on CPU
    if carry is not None and carry.state is not None:
        opt.load_state_dict(carry.state)
        for group in opt.param_groups:  # this call's budget, not the one the moments were made with
            group["lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
    return opt


def _keep(opt: torch.optim.Optimizer, carry: AdamCarry | None) -> None:
    if carry is not None:
        carry.state = opt.state_dict()


# A class absent from the training cells: its logit is lowered by log(1e-30) ~ -69, which leaves its gradient far
# below AdamW's eps (1e-8). A floor of 1e-6 does not: Adam rescales a 1e-7 gradient to a full step.
PRIOR_FLOOR = 1e-30


@contextmanager
def balanced_heads(model: VAE | SCDG, class_prior: np.ndarray | None) -> Iterator[None]:
    """Within the block, train the model's class head with balanced softmax (Ren et al., 2020; FedLC's logit
    calibration in federated learning): the log of ``class_prior`` (these training cells' class frequencies) is added to
    the logits in the loss, so the head learns class-balanced posteriors instead of this site's label mix, and a class
    the site lacks is not pushed down. Inference (``classify``, the label head) is unchanged."""
    if class_prior is None:
        yield
        return
    prior = np.maximum(np.asarray(class_prior, dtype=np.float64), PRIOR_FLOOR)
    model.train_logit_offset = torch.as_tensor(np.log(prior / prior.sum()), dtype=torch.float32).to(model_device(model))
    try:
        yield
    finally:
        model.train_logit_offset = None


def class_frequencies(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Each class's share of ``labels`` (n_classes,)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)[:n_classes]
    return counts / max(int(counts.sum()), 1)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters are (batches are moved there): callers place the model,
    ``shared.device.resolve_device``."""
    return next(model.parameters()).device


def dense_rows(X: Matrix, idx: np.ndarray) -> torch.Tensor:
    """Rows `idx` of a sparse or dense matrix as a float32 tensor (densifies the batch only)."""
    rows = X[idx]
    if sp.issparse(rows):
        rows = rows.toarray()
    return torch.from_numpy(np.asarray(rows, dtype=np.float32))


def row_view(X: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of X: a view sharing X's arrays when they are one contiguous ascending run of a CSR matrix (no copy
    of a hospital site's training cells), else ``X[idx]``."""
    idx = np.asarray(idx)
    if not (
        sp.issparse(X)
        and X.format == "csr"
        and idx.size
        and idx[-1] - idx[0] + 1 == idx.size
        and np.all(np.diff(idx) == 1)
    ):
        return X[idx]
    a, b = int(idx[0]), int(idx[-1]) + 1
    lo, hi = int(X.indptr[a]), int(X.indptr[b])
    # Assigned, not passed to the constructor: scipy copies ("prunes") index arrays that are a small part of their base.
    view = sp.csr_matrix((b - a, X.shape[1]), dtype=X.dtype)
    view.data, view.indices, view.indptr = X.data[lo:hi], X.indices[lo:hi], X.indptr[a : b + 1] - lo
    view.has_sorted_indices = X.has_sorted_indices
    return view


def anchor_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of a model's parameters: the fixed point of a proximal (FedProx) or anchor term."""
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def _pull(
    params: dict[str, torch.nn.Parameter], anchor: dict[str, torch.Tensor] | None, weight: float
) -> torch.Tensor | None:
    """``weight * sum ||p - anchor||^2`` over the parameters (None when off); gradients flow into ``params`` only."""
    if anchor is None or weight <= 0:
        return None
    return weight * cast(torch.Tensor, sum(((params[k] - anchor[k].detach()) ** 2).sum() for k in params))


def _seeded(model: torch.nn.Module, cfg: TrainConfig, dp: DPSGD | None) -> tuple[np.random.Generator, torch.device]:
    """Seed torch and the minibatch generator from ``cfg``; the model's device (CPU under DP-SGD)."""
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    dev = model_device(model)
    if dp is not None and dev.type != "cpu":
        msg = "DP-SGD runs on CPU (its noise comes from the site's CPU generator); use device='cpu' with dp-epsilon"
        raise ValueError(msg)
    return rng, dev


def _step(
    opt: torch.optim.Optimizer,
    total: torch.Tensor,
    prox: torch.Tensor | None,
    step: int,
    steps: int,
    history: list[float],
    progress: Callable[[int, int], None] | None,
    shift: GradientShift | None = None,
) -> None:
    """Back-propagate ``total`` plus the proximal pull ``prox``, shift the gradients (SCAFFOLD), step, and record
    every 100th loss.

    A DP-SGD step has set the noised gradients already and passes a loss without a graph: only the pull (it reads
    no cell) adds its gradient to them.
    """
    if prox is not None:
        total = total + prox
    if total.requires_grad:
        total.backward()
    if shift is not None:
        shift.apply()
    opt.step()
    if step % 100 == 0 or step == steps - 1:
        history.append(total.item())
        if progress is not None:
            progress(step + 1, steps)


def _batches(n: int, cfg: TrainConfig, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, n, size=min(cfg.batch_size, n))


def fit_vae(
    model: VAE,
    X: Matrix,
    labels: np.ndarray | None,
    cfg: TrainConfig,
    *,
    aux: np.ndarray | None = None,
    anchor: dict[str, torch.Tensor] | None = None,
    anchor_weight: float = 0.0,
    kl_ramp: tuple[float, float] | None = None,
    progress: Progress | None = None,
    library: np.ndarray | None = None,
    dp: DPSGD | None = None,
    dp_generator: torch.Generator | None = None,
    adam: AdamCarry | None = None,
    class_prior: np.ndarray | None = None,
    shift: GradientShift | None = None,
) -> list[float]:
    """Train `model` in place for cfg.steps minibatch steps; return the loss every 100 steps.

    The KL weight warms up from 0 to 1 over ``cfg.warmup_fraction`` of the steps, or (``kl_ramp``,
    one FedAvg round's share of a warm-up spread over many rounds) goes linearly from its first to
    its second value over these steps.

    With `anchor` (``anchor_of`` the received global weights) and `anchor_weight` = mu / 2 this is
    FedProx's local objective: the loss plus ``mu/2 * ||w - w_global||^2``.

    `library` (count input: each row's total counts over all genes) trains the VAE's count head too.

    `shift` (SCAFFOLD, ``shared.drift``) corrects every step's gradients for client drift and records them.

    `dp` makes every step a DP-SGD step (Poisson-sampled cells, per-cell clipping, Gaussian noise
    from `dp_generator`, a generator the site alone can reproduce); the returned losses are then NaN
    (a loss over real cells would be one more release).
    """
    rng, dev = _seeded(model, cfg, dp)
    opt = _adamw(model, cfg, adam)
    y = torch.as_tensor(labels, dtype=torch.long).to(dev) if labels is not None else None
    a = torch.as_tensor(aux, dtype=torch.float32).to(dev) if aux is not None else None
    lib = (
        torch.as_tensor(library, dtype=torch.float32).to(dev)
        if library is not None and model.count_head is not None
        else None
    )
    anchor = {k: v.to(dev) for k, v in anchor.items()} if anchor is not None else None
    params = dict(model.named_parameters())
    model.train()
    history: list[float] = []
    warm = max(1, int(cfg.steps * cfg.warmup_fraction))
    with balanced_heads(model, class_prior):
        for step in range(cfg.steps):
            beta = (
                min(1.0, (step + 1) / warm)
                if kl_ramp is None
                else kl_ramp[0] + (kl_ramp[1] - kl_ramp[0]) * (step + 1) / cfg.steps
            )
            opt.zero_grad(set_to_none=True)
            if dp is not None:
                _dp_vae_grads(model, X, y, a, lib, beta, dp, dp_generator)
                total = torch.tensor(float("nan"))
            else:
                idx = _batches(X.shape[0], cfg, rng)
                out = model.loss(
                    dense_rows(X, idx).to(dev),
                    y[idx] if y is not None else None,
                    a[idx] if a is not None else None,
                    beta_scale=beta,
                    library=lib[idx] if lib is not None else None,
                )
                total = out.total
            _step(opt, total, _pull(params, anchor, anchor_weight), step, cfg.steps, history, progress, shift)
    _keep(opt, adam)
    model.eval()
    return history


def _dp_generator(dp: DPSGD, gen: torch.Generator | None) -> torch.Generator:
    if gen is None:
        msg = "DP-SGD needs the site's secret generator (shared.privacy.mechanisms.torch_generator)"
        raise ValueError(msg)
    return gen


def _dp_vae_grads(
    model: VAE,
    X: Matrix,
    y: torch.Tensor | None,
    a: torch.Tensor | None,
    lib: torch.Tensor | None,
    beta: float,
    dp: DPSGD,
    gen: torch.Generator | None,
) -> None:
    """One DP-SGD step's noisy gradient of the VAE loss into the parameters' ``.grad``."""
    idx = poisson_batch(X.shape[0], dp.sample_rate, _dp_generator(dp, gen)).numpy()
    x = dense_rows(X, idx)
    none = torch.zeros(len(idx))  # placeholder rows for absent inputs (vmap needs tensors)

    def cell_loss(m: VAE, xi: torch.Tensor, yi: torch.Tensor, ai: torch.Tensor, li: torch.Tensor) -> torch.Tensor:
        return m.cell_losses(
            xi,
            yi if y is not None else None,
            ai if a is not None else None,
            beta_scale=beta,
            library=li if lib is not None else None,
        )

    rows = (
        x,
        y[idx] if y is not None else none.long(),
        a[idx] if a is not None else none,
        lib[idx] if lib is not None else none,
    )
    noisy_step_grads(model, cell_loss, rows, dp, gen)  # type: ignore[arg-type]


@torch.no_grad()
def encode(model: VAE, X: Matrix, batch_size: int = 1024) -> np.ndarray:
    """Posterior means (n, d) of all rows of X, in batches."""
    model.eval()
    dev = model_device(model)
    out = [
        model.encode(dense_rows(X, np.arange(i, min(i + batch_size, X.shape[0]))).to(dev))[0].cpu()
        for i in range(0, X.shape[0], batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, model.config.latent_dim), np.float32)


@torch.no_grad()
def set_latent_stats(model: SCDG, mean: np.ndarray, std: np.ndarray) -> None:
    """Store the latent standardisation statistics in the generator's buffers."""
    model.z_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
    model.z_std.copy_(torch.as_tensor(np.maximum(std, 1e-4), dtype=torch.float32))


def fit_scdg(
    model: SCDG,
    Z: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    *,
    anchor: dict[str, torch.Tensor] | None = None,
    anchor_weight: float = 0.0,
    progress: Progress | None = None,
    dp: DPSGD | None = None,
    dp_generator: torch.Generator | None = None,
    adam: AdamCarry | None = None,
    class_prior: np.ndarray | None = None,
    shift: GradientShift | None = None,
) -> list[float]:
    """Train the generator in place on encoder latents Z (n, d) with class ids; return losses.

    With `anchor` (a state dict) an L2 pull toward those weights bounds fine-tuning drift. `dp`:
    DP-SGD steps, `adam`, `class_prior` (for the QA head) and `shift`, as in ``fit_vae``.
    """
    rng, dev = _seeded(model, cfg, dp)
    zs = model.standardize(torch.as_tensor(Z, dtype=torch.float32).to(dev))
    y = torch.as_tensor(labels, dtype=torch.long).to(dev)
    anchor = {k: v.to(dev) for k, v in anchor.items()} if anchor is not None else None
    opt = _adamw(model, cfg, adam)
    params = dict(model.named_parameters())
    model.train()
    history: list[float] = []
    with balanced_heads(model, class_prior):
        for step in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            if dp is not None:
                idx = poisson_batch(len(zs), dp.sample_rate, _dp_generator(dp, dp_generator))
                noisy_step_grads(model, lambda m, zi, ci: m.cell_losses(zi, ci), (zs[idx], y[idx]), dp, dp_generator)  # type: ignore[arg-type]
                total = torch.tensor(float("nan"))
            else:
                idx = torch.as_tensor(_batches(len(zs), cfg, rng))
                total, _, _ = model.loss(zs[idx], y[idx])
            _step(opt, total, _pull(params, anchor, anchor_weight), step, cfg.steps, history, progress, shift)
    _keep(opt, adam)
    model.eval()
    return history
