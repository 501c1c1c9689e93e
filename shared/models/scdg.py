"""SCDG: a class-conditional denoiser on (standardised) latents, used for ONE denoising step.

ẑ₀ = (w - √(1-ᾱ_t) · ε̃(w, t, c)) / √ᾱ_t, with ε̃ the classifier-free-guidance mix of the
conditional and null predictions. One network call, so gradients of any loss on ẑ₀ (or on the
decoded cells) reach the code w intact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SCDGConfig:
    """Shape, schedule and loss weights of the generator."""

    latent_dim: int
    n_classes: int
    hidden: int = 256
    n_blocks: int = 2
    time_dim: int = 64
    timesteps: int = 1000
    p_uncond: float = 0.1  # probability of training with the null class (guidance)
    qa_weight: float = 0.1  # quality-assurance classifier loss on the one-step estimate

    def __post_init__(self) -> None:
        if self.n_classes < 1:
            msg = f"SCDGConfig needs n_classes >= 1, got {self.n_classes}"
            raise ValueError(msg)


def cosine_alpha_bar(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Cumulative signal level ᾱ_t for t = 0..T-1 of the cosine schedule (Nichol & Dhariwal)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos(((steps / timesteps) + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0).float()


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (n,) -> (n, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class _ResBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, hidden * 2), nn.SiLU(), nn.Linear(hidden * 2, hidden))
        self.cond = nn.Linear(hidden, hidden * 2)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """`cond` = self.cond(embedding), (n, 2h): FiLM scale and shift."""
        scale, shift = cond.chunk(2, dim=1)
        return h + self.ff(self.norm(h) * (1 + scale) + shift)


class SCDG(nn.Module):
    """Single-step conditional diffusion generator with a latent quality-assurance classifier.

    Works in a standardised latent space: ``standardize`` maps encoder latents to zero mean and
    unit variance per dimension (statistics stored as buffers, set by the trainer).
    """

    # parameters whose first n_classes rows belong to one class each (the null-class row after them is shared)
    class_rows: tuple[str, ...] = ("class_emb.weight", "qa.2.weight", "qa.2.bias")
    # buffers (registered in __init__), declared for type checkers: nn.Module's __getattr__ is untyped
    alpha_bar: torch.Tensor
    z_mean: torch.Tensor
    z_std: torch.Tensor

    def __init__(self, config: SCDGConfig) -> None:
        super().__init__()
        self.config = config
        d, h = config.latent_dim, config.hidden
        self.register_buffer("alpha_bar", cosine_alpha_bar(config.timesteps))
        self.register_buffer("z_mean", torch.zeros(d))
        self.register_buffer("z_std", torch.ones(d))
        self.inp = nn.Linear(d, h)
        self.time_mlp = nn.Sequential(nn.Linear(config.time_dim, h), nn.SiLU(), nn.Linear(h, h))
        self.class_emb = nn.Embedding(config.n_classes + 1, h)  # last index = null class
        self.blocks = nn.ModuleList(_ResBlock(h) for _ in range(config.n_blocks))
        self.out = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, d))
        last = cast(nn.Linear, self.out[1])
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.qa = nn.Sequential(nn.Linear(d, h), nn.SiLU(), nn.Linear(h, config.n_classes))
        # Added to the QA logits in the training loss only (balanced softmax, as the VAE's ``train_logit_offset``).
        self.train_logit_offset: torch.Tensor | None = None

    def _res_blocks(self) -> Iterable[_ResBlock]:
        """The residual blocks, typed (nn.ModuleList iterates as plain modules)."""
        return cast("Iterable[_ResBlock]", self.blocks)

    @property
    def null_class(self) -> int:
        """Index of the learned null class used for classifier-free guidance."""
        return self.config.n_classes

    def standardize(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder latents -> standardised latents."""
        return (z - self.z_mean) / self.z_std

    def unstandardize(self, zs: torch.Tensor) -> torch.Tensor:
        """Standardised latents -> encoder latents."""
        return zs * self.z_std + self.z_mean

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor, *, dedupe: bool = True) -> torch.Tensor:
        """Predict the noise in z_t (n, d) at integer steps t (n,) for classes c (n,)."""
        if not dedupe:  # row by row (per-cell gradients: torch.func cannot vmap torch.unique)
            emb = self.time_mlp(timestep_embedding(t, self.config.time_dim)) + self.class_emb(c)
            h = self.inp(z_t)
            for block in self._res_blocks():
                h = block(h, block.cond(emb))
            return self.out(h)
        # Conditioning depends only on (t, c): compute it once per distinct pair (distillation uses
        # one t* and few classes for many codes), then gather per row.
        key = t * (self.config.n_classes + 1) + c
        uniq, inv = torch.unique(key, return_inverse=True)
        t_u, c_u = uniq // (self.config.n_classes + 1), uniq % (self.config.n_classes + 1)
        emb = self.time_mlp(timestep_embedding(t_u, self.config.time_dim)) + self.class_emb(c_u)
        h = self.inp(z_t)
        for block in self._res_blocks():
            h = block(h, block.cond(emb)[inv])
        return self.out(h)

    def guided_eps(self, z_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor, guidance: float) -> torch.Tensor:
        """Classifier-free guidance: (1 + s) ε(z, t, c) - s ε(z, t, ∅)."""
        if guidance == 0:
            return self.eps(z_t, t, c)
        n = z_t.shape[0]
        both = self.eps(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([c, torch.full_like(c, self.null_class)]))
        cond, null = both[:n], both[n:]
        return (1 + guidance) * cond - guidance * null

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward-noise standardised latents to steps t."""
        ab = self.alpha_bar[t][:, None]
        return ab.sqrt() * z0 + (1 - ab).sqrt() * noise

    def one_step(self, w: torch.Tensor, t_star: int, c: torch.Tensor, guidance: float) -> torch.Tensor:
        """Single guided denoising step from codes w at level t_star -> standardised ẑ₀ (n, d)."""
        t = torch.full((w.shape[0],), int(t_star), dtype=torch.long, device=w.device)
        ab = self.alpha_bar[t][:, None]
        return (w - (1 - ab).sqrt() * self.guided_eps(w, t, c, guidance)) / ab.sqrt()

    def classify(self, zs: torch.Tensor) -> torch.Tensor:
        """Quality-assurance classifier logits on standardised latents."""
        return self.qa(zs)

    def loss(
        self, zs: torch.Tensor, c: torch.Tensor, *, dedupe: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (total, noise MSE, QA cross-entropy) on a batch of standardised latents (``dedupe``: see ``eps``)."""
        mse, qa_hat, w, qa_clean = self._cell_terms(zs, c, dedupe=dedupe)
        # The QA classifier learns on clean latents and judges the one-step estimate; weighting by
        # ᾱ_t keeps near-pure-noise steps from dominating.
        qa = (qa_hat * w).sum() / w.sum().clamp(min=1.0) + qa_clean.mean()
        return mse.mean() + self.config.qa_weight * qa, mse.mean(), qa

    def cell_losses(self, zs: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Each latent's own loss (n,): ``loss`` of a batch of that one row (DP-SGD clips per cell)."""
        mse, qa_hat, w, qa_clean = self._cell_terms(zs, c, dedupe=False)
        return mse + self.config.qa_weight * (qa_hat * w / w.clamp(min=1.0) + qa_clean)

    def _cell_terms(self, zs: torch.Tensor, c: torch.Tensor, *, dedupe: bool) -> tuple[torch.Tensor, ...]:
        """Per row: noise MSE, QA cross-entropy on the one-step estimate and its weight, QA cross-entropy on the clean
        latent."""
        n = zs.shape[0]
        t = torch.randint(0, self.config.timesteps, (n,), device=zs.device)
        noise = torch.randn_like(zs)
        z_t = self.q_sample(zs, t, noise)
        drop = torch.rand(n, device=zs.device) < self.config.p_uncond
        c_in = torch.where(drop, torch.full_like(c, self.null_class), c)
        pred = self.eps(z_t, t, c_in, dedupe=dedupe)
        mse = ((pred - noise) ** 2).mean(1)
        ab = self.alpha_bar[t][:, None]
        z0_hat = (z_t - (1 - ab).sqrt() * pred) / ab.sqrt()
        w = ab.squeeze(1) * (~drop).float()
        offset = self.train_logit_offset if self.train_logit_offset is not None else 0.0
        return (
            mse,
            F.cross_entropy(self.classify(z0_hat) + offset, c, reduction="none"),
            w,
            F.cross_entropy(self.classify(zs) + offset, c, reduction="none"),
        )
