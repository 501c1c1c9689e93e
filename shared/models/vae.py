"""Latent variational autoencoder: log-normalised expression x in R^G <-> latent z in R^d."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.models.likelihood import nb_log_prob

DecodeMode = Literal[
    "expected", "sparse", "sample", "counts", "gaussian"
]  # "counts": X from counts sampled by the count head (shared.counts)

# A fixed, public model of how real cells spread around an expected profile (log-normalised values): per gene, a
# Gaussian of variance CELL_VAR_RATIO x the value, clipped to [0, LOG_MAX]. The DP path uses it twice: the server
# pretrains on cells drawn with it around the released class means (server.dp_pretrain), and decode-mode "gaussian"
# draws synthetic cells with it around each code's expected expression.
CELL_VAR_RATIO = 0.5
LOG_MAX = math.log1p(1e4)  # the largest log-normalised value a cell can have (all its counts on one gene)


def gaussian_cells(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cells drawn around expected profiles ``x`` (n, G) with the public cell model (seeded through ``generator``)."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)  # on CPU: same on any device
    return (x + torch.sqrt(CELL_VAR_RATIO * x) * noise).clamp(0.0, LOG_MAX)


@dataclass(frozen=True)
class VAEConfig:
    """Shape and loss weights of the latent autoencoder."""

    n_genes: int
    latent_dim: int = 64
    hidden: tuple[int, ...] = (256, 128)
    dropout: float = 0.1
    n_classes: int = 0  # > 0 adds a label head on z (semi-supervised latent space)
    n_aux: int = 0  # > 0 adds a head predicting an external foundation-model embedding
    beta: float = 0.05  # KL weight
    class_weight: float = 1.0
    aux_weight: float = 1.0
    count_head: bool = False  # True adds a negative-binomial head on (detached) z for raw counts (synthetic counts)
    # > 0: a learned site vector of this size joins the encoder's and decoder's inputs (scVI's batch covariate; run
    # config ``site-covariate``): one vector per model, each site trains its own and the server keeps them apart
    site_dim: int = 0

    def __post_init__(self) -> None:
        if self.n_genes < 1 or self.latent_dim < 1 or self.site_dim < 0:
            msg = (
                "VAEConfig needs n_genes >= 1, latent_dim >= 1 and site_dim >= 0, got "
                f"{self.n_genes}, {self.latent_dim}, {self.site_dim}"
            )
            raise ValueError(msg)


@dataclass(frozen=True)
class VAELoss:
    """Loss terms of one VAE batch (tensors, total is differentiable)."""

    total: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    label: torch.Tensor
    aux: torch.Tensor
    counts: torch.Tensor  # negative log-likelihood of the counts per cell (0 without a count head or counts)


def _mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in pairwise(sizes):
        layers += [nn.Linear(a, b), nn.LayerNorm(b), nn.SiLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


TARGET_SUM = 1e4  # shared.data.TARGET_SUM: log-normalised input is log1p(counts / library * TARGET_SUM)


# cells of each batch the count head learns from: it trains on the detached z, so fewer rows cost it nothing else
COUNT_ROWS = 64


def counts_from_lognorm(x: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
    """The raw counts behind log-normalised rows ``x`` of cells with total counts ``library`` (rounded to integers)."""
    return torch.round(torch.expm1(x) * (library[:, None] / TARGET_SUM)).clamp_min(0.0)


class CountHead(nn.Module):
    """z -> negative-binomial counts of the plan genes: proportions (softmax) times the cell's plan-gene total, and a
    per-gene inverse dispersion (scVI's NB decoder with a gene-wise theta)."""

    def __init__(self, latent_dim: int, hidden: int, n_genes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.LayerNorm(hidden), nn.SiLU())
        self.to_rho = nn.Linear(hidden, n_genes)
        self.log_theta = nn.Parameter(torch.zeros(n_genes))

    def parts(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(proportions over the plan genes (n, G) summing to 1, inverse dispersion (G,))."""
        return torch.softmax(self.to_rho(self.net(z)), dim=-1), torch.exp(self.log_theta.clamp(-8.0, 8.0))

    def log_prob(self, z: torch.Tensor, counts: torch.Tensor, *, exact: bool = True) -> torch.Tensor:
        """log p(counts | z) per cell (n,), the mean being the proportions times the observed plan-gene total
        (``exact=False``: up to a term of the counts alone, as training uses it)."""
        rho, theta = self.parts(z)
        mu = rho * counts.sum(1, keepdim=True)
        return nb_log_prob(counts, mu, theta, exact=exact).sum(1)


SITE_KEY = "site_embedding"  # the state-dict entry of the site vector (``VAEConfig.site_dim``)


class VAE(nn.Module):
    """VAE with a zero-inflated decoder: a non-negative mean and a detection logit per gene.

    The decoder's *expected* output ``sigmoid(logit) * mean`` is smooth and used wherever
    gradients must flow; the *sparse* output keeps the mean only where detection is likely, so
    decoded cells have a realistic fraction of zeros.
    """

    # parameters whose first n_classes rows belong to one class each (class-aware aggregation)
    class_rows: tuple[str, ...] = ("label_head.weight", "label_head.bias")

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        h = list(config.hidden)
        self.encoder = _mlp([config.n_genes + config.site_dim, *h], config.dropout)
        self.to_mu = nn.Linear(h[-1], config.latent_dim)
        self.to_logvar = nn.Linear(h[-1], config.latent_dim)
        self.decoder = _mlp([config.latent_dim + config.site_dim, *reversed(h)], config.dropout)
        self.to_mean = nn.Linear(h[0], config.n_genes)
        self.to_logit = nn.Linear(h[0], config.n_genes)
        self.label_head = nn.Linear(config.latent_dim, config.n_classes) if config.n_classes else None
        self.aux_head = nn.Linear(config.latent_dim, config.n_aux) if config.n_aux else None
        # Created last and without dropout: the other parameters start and train exactly as without it
        # (same initial values, same random stream), so adding counts leaves the latent space as it was.
        self.count_head = (
            CountHead(config.latent_dim, h[-1], config.n_genes) if config.count_head else None
        )  # as wide as the narrowest layer
        # The site this model instance stands for (zeros draw nothing from the random stream); None without it.
        self.site_embedding = nn.Parameter(torch.zeros(config.site_dim)) if config.site_dim else None
        # Added to the label head's logits in the training loss only (balanced softmax; ``shared.fitting``'s
        # ``class_prior``): not a parameter or buffer, so it never travels with the weights.
        self.train_logit_offset: torch.Tensor | None = None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mu, logvar), each (n, d)."""
        h = self.encoder(self._with_site(x))
        return self.to_mu(h), self.to_logvar(h).clamp(-10.0, 10.0)

    @contextmanager
    def as_site(self, vector: np.ndarray | None) -> Iterator[VAE]:
        """This model with ``vector`` as its site vector while the block runs (the model's own is restored after);
        ``None`` keeps the model's own."""
        if vector is None or self.site_embedding is None:
            yield self
            return
        own = self.site_embedding.detach().clone()
        with torch.no_grad():
            self.site_embedding.copy_(torch.as_tensor(np.asarray(vector), dtype=own.dtype))
        try:
            yield self
        finally:
            with torch.no_grad():
                self.site_embedding.copy_(own)

    def _with_site(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` with the site vector appended to every row (unchanged without a site covariate)."""
        if self.site_embedding is None:
            return t
        return torch.cat([t, self.site_embedding.to(t.dtype).expand(t.shape[0], -1)], dim=1)

    def decode_parts(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mean >= 0, detection logit), each (n, G)."""
        h = self.decoder(self._with_site(z))
        return F.softplus(self.to_mean(h)), self.to_logit(h)

    def decode(
        self, z: torch.Tensor, mode: DecodeMode = "expected", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Decode latents to log-normalised expression (n, G).

        expected: sigmoid(logit) * mean (smooth, differentiable); sparse: mean where logit > 0;
        sample: mean where a Bernoulli(sigmoid(logit)) draw says the gene is detected (cell-like
        zero fraction; seeded through `generator`); gaussian: expected plus the public cell model's noise
        (variance CELL_VAR_RATIO x the value, clipped to [0, LOG_MAX]; seeded through `generator`).
        """
        mean, logit = self.decode_parts(z)
        if mode == "expected":
            return torch.sigmoid(logit) * mean
        if mode == "gaussian":
            return gaussian_cells(torch.sigmoid(logit) * mean, generator)
        if mode == "sample":
            return mean * torch.bernoulli(torch.sigmoid(logit), generator=generator)
        if mode == "sparse":
            return torch.where(logit > 0, mean, torch.zeros_like(mean))
        msg = (
            f"decode mode {mode!r} needs library sizes: use shared.counts.sample_counts"
            if mode == "counts"
            else f"unknown decode mode {mode!r}"
        )
        raise ValueError(msg)

    def loss(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        aux: torch.Tensor | None = None,
        beta_scale: float = 1.0,
        library: torch.Tensor | None = None,
    ) -> VAELoss:
        """Zero-inflated reconstruction + KL (+ label and foundation-embedding heads, + the count head's NB likelihood).

        ``library`` (n,): each cell's total counts over ALL its genes, for cells of count input; the
        plan genes' counts are then ``expm1(x) * library / TARGET_SUM`` (x = log1p of the normalised counts).
        """
        recon, kl, label_loss, aux_loss, count_loss = (
            t.mean() for t in self._cell_terms(x, labels, aux, library, COUNT_ROWS)
        )
        c = self.config
        total = recon + c.beta * beta_scale * kl + c.class_weight * label_loss + c.aux_weight * aux_loss + count_loss
        return VAELoss(total, recon, kl, label_loss, aux_loss, count_loss)

    def cell_losses(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        aux: torch.Tensor | None = None,
        beta_scale: float = 1.0,
        library: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each cell's own loss (n,): the terms of ``loss`` row by row, the count term on every row (DP-SGD clips per
        cell)."""
        recon, kl, label_loss, aux_loss, count_loss = self._cell_terms(x, labels, aux, library, x.shape[0])
        c = self.config
        return recon + c.beta * beta_scale * kl + c.class_weight * label_loss + c.aux_weight * aux_loss + count_loss

    def _cell_terms(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None,
        aux: torch.Tensor | None,
        library: torch.Tensor | None,
        count_rows: int,
    ) -> tuple[torch.Tensor, ...]:
        """Per-row reconstruction, KL, label and aux losses (n,) and the count term of the first ``count_rows`` rows."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        mean, logit = self.decode_parts(z)
        detected = (x > 0).float()
        bce = F.binary_cross_entropy_with_logits(logit, detected, reduction="none").sum(1)
        mse = ((mean - x) ** 2 * detected).sum(1)
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)
        zero = x.new_zeros(1)
        label_loss = zero
        if self.label_head is not None and labels is not None:
            logits = self.label_head(mu)
            if self.train_logit_offset is not None:
                logits = logits + self.train_logit_offset
            label_loss = F.cross_entropy(logits, labels, reduction="none")
        aux_loss = zero
        if self.aux_head is not None and aux is not None:
            aux_loss = F.mse_loss(self.aux_head(mu), aux, reduction="none").sum(1)
        count_loss = zero
        if self.count_head is not None and library is not None:
            rows = slice(0, count_rows)  # the batch is a random draw: its first rows are one too
            counts = counts_from_lognorm(x[rows], library[rows])
            count_loss = -self.count_head.log_prob(z[rows].detach(), counts, exact=False)
        return bce + mse, kl, label_loss, aux_loss, count_loss
