"""Latent variational autoencoder: log-normalised expression x in R^G <-> latent z in R^d."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

DecodeMode = Literal["expected", "sparse", "sample"]


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

    def __post_init__(self) -> None:
        if self.n_genes < 1 or self.latent_dim < 1:
            msg = f"VAEConfig needs n_genes >= 1 and latent_dim >= 1, got {self.n_genes}, {self.latent_dim}"
            raise ValueError(msg)


@dataclass(frozen=True)
class VAELoss:
    """Loss terms of one VAE batch (tensors, total is differentiable)."""

    total: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    label: torch.Tensor
    aux: torch.Tensor


def _mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.LayerNorm(b), nn.SiLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


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
        self.encoder = _mlp([config.n_genes, *h], config.dropout)
        self.to_mu = nn.Linear(h[-1], config.latent_dim)
        self.to_logvar = nn.Linear(h[-1], config.latent_dim)
        self.decoder = _mlp([config.latent_dim, *reversed(h)], config.dropout)
        self.to_mean = nn.Linear(h[0], config.n_genes)
        self.to_logit = nn.Linear(h[0], config.n_genes)
        self.label_head = nn.Linear(config.latent_dim, config.n_classes) if config.n_classes else None
        self.aux_head = nn.Linear(config.latent_dim, config.n_aux) if config.n_aux else None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mu, logvar), each (n, d)."""
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h).clamp(-10.0, 10.0)

    def decode_parts(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mean >= 0, detection logit), each (n, G)."""
        h = self.decoder(z)
        return F.softplus(self.to_mean(h)), self.to_logit(h)

    def decode(self, z: torch.Tensor, mode: DecodeMode = "expected", generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode latents to log-normalised expression (n, G).

        expected: sigmoid(logit) * mean (smooth, differentiable); sparse: mean where logit > 0;
        sample: mean where a Bernoulli(sigmoid(logit)) draw says the gene is detected (cell-like
        zero fraction; seeded through `generator`).
        """
        mean, logit = self.decode_parts(z)
        if mode == "expected":
            return torch.sigmoid(logit) * mean
        if mode == "sample":
            return mean * torch.bernoulli(torch.sigmoid(logit), generator=generator)
        return torch.where(logit > 0, mean, torch.zeros_like(mean))

    def loss(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        aux: torch.Tensor | None = None,
        beta_scale: float = 1.0,
    ) -> VAELoss:
        """Zero-inflated reconstruction + KL (+ label and foundation-embedding heads)."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        mean, logit = self.decode_parts(z)
        detected = (x > 0).float()
        bce = F.binary_cross_entropy_with_logits(logit, detected, reduction="none").sum(1)
        mse = ((mean - x) ** 2 * detected).sum(1)
        recon = (bce + mse).mean()
        kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)).mean()
        zero = x.new_zeros(())
        label_loss = zero
        if self.label_head is not None and labels is not None:
            label_loss = F.cross_entropy(self.label_head(mu), labels)
        aux_loss = zero
        if self.aux_head is not None and aux is not None:
            aux_loss = F.mse_loss(self.aux_head(mu), aux, reduction="none").sum(1).mean()
        c = self.config
        total = recon + c.beta * beta_scale * kl + c.class_weight * label_loss + c.aux_weight * aux_loss
        return VAELoss(total, recon, kl, label_loss, aux_loss)
