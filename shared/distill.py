"""scDD code distillation: learn k latent codes per class that the frozen SCDG + decoder turn into cells."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from shared.errors import ConfigError
from shared.models import SCDG, VAE
from shared.models.vae import DecodeMode
from shared.training import dense_rows, encode

logger = logging.getLogger(__name__)

Init = Literal["real", "noise"]


@dataclass(frozen=True)
class DistillConfig:
    """Objective weights and budget of code distillation at one site."""

    k: int = 10
    iterations: int = 200
    lr: float = 0.05
    t_star: int = -1  # -1: chosen from k (see `resolve_t_star`)
    guidance: float = 2.0
    init: Init = "real"
    latent_weight: float = 1.0  # mean matching in the encoder's latent space
    mmd_weight: float = 1.0  # RBF-MMD in the encoder's latent space
    gene_mean_weight: float = 1.0  # per-class mean matching in gene space (decoded cells vs real)
    gene_weight: float = 0.0  # mean matching through random networks in gene space
    gm_weight: float = 0.0  # gradient matching on a random classifier (option)
    class_weight: float = 0.1  # QA-classifier cross-entropy on ẑ₀
    prior_weight: float = 0.1  # keeps codes on the noise shell of level t*
    real_batch: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1 or self.iterations < 0 or self.lr <= 0:
            msg = f"DistillConfig needs k >= 1, iterations >= 0, lr > 0; got k={self.k}, iterations={self.iterations}, lr={self.lr}"
            raise ConfigError(msg)
        if self.init not in ("real", "noise"):
            msg = f"init must be 'real' or 'noise', got {self.init!r}"
            raise ConfigError(msg)


def resolve_t_star(cfg: DistillConfig, timesteps: int = 1000) -> int:
    """t* from the config, or by k: a higher level (more prototype-like) for very small k."""
    t = cfg.t_star if cfg.t_star >= 0 else (600 if cfg.k <= 2 else 400)
    if not 0 <= t < timesteps:
        msg = f"t_star must be in [0, {timesteps}), got {t}"
        raise ConfigError(msg)
    return t


@dataclass(frozen=True)
class Codes:
    """Distilled codes of one site: (n, d) float32 codes and their global class ids."""

    codes: np.ndarray
    labels: np.ndarray
    t_star: int
    guidance: float

    @property
    def nbytes(self) -> int:
        """Bytes of codes plus labels as they are uploaded (float32 codes, int32 labels)."""
        return int(self.codes.astype(np.float32).nbytes + self.labels.astype(np.int32).nbytes)


def _init_codes(scdg: SCDG, zs_real: torch.Tensor, y_real: np.ndarray, classes: np.ndarray, cfg: DistillConfig, t_star: int, gen: torch.Generator) -> torch.Tensor:
    rows = []
    for c in classes:
        pool = np.flatnonzero(y_real == c)
        pick = pool[torch.randint(len(pool), (cfg.k,), generator=gen).numpy()] if len(pool) < cfg.k else pool[torch.randperm(len(pool), generator=gen)[: cfg.k].numpy()]
        noise = torch.randn(cfg.k, zs_real.shape[1], generator=gen)
        if cfg.init == "noise":
            rows.append(noise)
        else:
            t = torch.full((cfg.k,), t_star, dtype=torch.long)
            rows.append(scdg.q_sample(zs_real[pick], t, noise))
    return torch.cat(rows)


def _mmd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RBF-MMD² with a median-heuristic bandwidth (computed without gradient)."""
    xy = torch.cat([a, b])
    d2 = torch.cdist(xy, xy) ** 2
    with torch.no_grad():
        bw = d2[d2 > 0].median() if (d2 > 0).any() else torch.tensor(1.0)
    k = torch.exp(-d2 / bw.clamp(min=1e-6))
    n = a.shape[0]
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def _gene_dm(real: torch.Tensor, synth: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mean matching through a freshly drawn random 2-layer network in gene space."""
    g = real.shape[1]
    w1 = torch.randn(g, 256, generator=gen) / g**0.5
    w2 = torch.randn(256, 128, generator=gen) / 16.0
    emb = lambda x: F.relu(x @ w1) @ w2  # noqa: E731
    return ((emb(real).mean(0) - emb(synth).mean(0)) ** 2).sum()


def _gradient_match(real: torch.Tensor, y_real: torch.Tensor, synth: torch.Tensor, y_synth: torch.Tensor, n_classes: int, gen: torch.Generator) -> torch.Tensor:
    """Layer-wise cosine distance between a random linear classifier's gradients on real and synthetic cells."""
    w = (torch.randn(real.shape[1], n_classes, generator=gen) * 0.01).requires_grad_(True)
    b = torch.zeros(n_classes, requires_grad=True)
    g_real = torch.autograd.grad(F.cross_entropy(real @ w + b, y_real), [w, b])
    g_syn = torch.autograd.grad(F.cross_entropy(synth @ w + b, y_synth), [w, b], create_graph=True)
    return sum(1 - F.cosine_similarity(gr.detach().flatten(), gs.flatten(), dim=0) for gr, gs in zip(g_real, g_syn, strict=True))


def synthesize(vae: VAE, scdg: SCDG, codes: torch.Tensor, labels: torch.Tensor, *, t_star: int, guidance: float, mode: DecodeMode = "expected") -> tuple[torch.Tensor, torch.Tensor]:
    """Codes -> (standardised ẑ₀, decoded cells): one guided step, then the decoder."""
    zs0 = scdg.one_step(codes, t_star, labels, guidance)
    return zs0, vae.decode(scdg.unstandardize(zs0), mode=mode)


def distill_codes(
    vae: VAE,
    scdg: SCDG,
    X: sp.csr_matrix | np.ndarray,
    labels: np.ndarray,
    cfg: DistillConfig,
    *,
    init_codes: Codes | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Codes:
    """Distill cfg.k codes for every class present in `labels` (global class ids) of a site.

    The generator and decoder are frozen; only the codes are optimised (Adam).
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t_star = resolve_t_star(cfg, scdg.config.timesteps)
    for p in [*vae.parameters(), *scdg.parameters()]:
        p.requires_grad_(False)
    vae.eval()
    scdg.eval()
    zs_real = scdg.standardize(torch.from_numpy(encode(vae, X)))
    classes = np.unique(labels)
    if init_codes is not None and set(np.unique(init_codes.labels)) == set(classes) and len(init_codes.labels) == cfg.k * len(classes):
        order = np.argsort(init_codes.labels, kind="stable")
        w0 = torch.as_tensor(init_codes.codes[order], dtype=torch.float32)
    else:
        w0 = _init_codes(scdg, zs_real, labels, classes, cfg, t_star, gen)
    y_syn = torch.as_tensor(np.repeat(classes, cfg.k), dtype=torch.long)
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=cfg.lr)
    pools = {int(c): np.flatnonzero(labels == c) for c in classes}
    gene_means = torch.stack([torch.from_numpy(np.asarray(X[pools[int(c)]].mean(0), dtype=np.float32).ravel()) for c in classes])
    for it in range(cfg.iterations):
        loss = _objective(vae, scdg, X, zs_real, pools, gene_means, w, y_syn, cfg, t_star, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None and (it % 20 == 0 or it == cfg.iterations - 1):
            progress(it + 1, cfg.iterations)
    return Codes(w.detach().numpy().astype(np.float32), y_syn.numpy().astype(np.int64), t_star, cfg.guidance)


def _objective(vae: VAE, scdg: SCDG, X: sp.csr_matrix | np.ndarray, zs_real: torch.Tensor, pools: dict[int, np.ndarray], gene_means: torch.Tensor, w: torch.Tensor, y_syn: torch.Tensor, cfg: DistillConfig, t_star: int, gen: torch.Generator) -> torch.Tensor:
    """One iteration's loss summed over classes."""
    zs0, cells = synthesize(vae, scdg, w, y_syn, t_star=t_star, guidance=cfg.guidance)
    need_genes = cfg.gene_weight > 0 or cfg.gm_weight > 0
    z_cells = scdg.standardize(vae.encode(cells)[0])
    total = cfg.class_weight * F.cross_entropy(scdg.classify(zs0), y_syn)
    total = total + cfg.prior_weight * (((w**2).mean(1) - 1.0) ** 2).mean()
    real_rows, real_y = [], []
    for j, (c, pool) in enumerate(pools.items()):
        idx = pool[torch.randint(len(pool), (min(cfg.real_batch, len(pool)),), generator=gen).numpy()]
        mask = y_syn == c
        zr = zs_real[idx]
        if cfg.gene_mean_weight > 0:
            total = total + cfg.gene_mean_weight * ((cells[mask].mean(0) - gene_means[j]) ** 2).sum()
        for z_syn in (zs0[mask], z_cells[mask]):
            total = total + cfg.latent_weight * ((zr.mean(0) - z_syn.mean(0)) ** 2).sum()
            if cfg.mmd_weight > 0 and mask.sum() > 1:
                total = total + cfg.mmd_weight * _mmd(zr, z_syn)
        if need_genes:
            real_rows.append(idx)
            real_y.append(np.full(len(idx), c))
    if need_genes:
        idx = np.concatenate(real_rows)
        xr, yr = dense_rows(X, idx), torch.as_tensor(np.concatenate(real_y), dtype=torch.long)
        if cfg.gene_weight > 0:
            for c in pools:
                total = total + cfg.gene_weight * _gene_dm(xr[yr == c], cells[y_syn == c], gen)
        if cfg.gm_weight > 0:
            n_cls = int(scdg.config.n_classes)
            total = total + cfg.gm_weight * _gradient_match(xr, yr, cells, y_syn, n_cls, gen)
    return total


@torch.no_grad()
def generate(vae: VAE, scdg: SCDG, codes: Codes, *, mode: DecodeMode = "sparse") -> np.ndarray:
    """Decode codes into synthetic log-normalised cells (n, G) float32."""
    vae.eval()
    scdg.eval()
    w = torch.as_tensor(codes.codes, dtype=torch.float32)
    y = torch.as_tensor(codes.labels, dtype=torch.long)
    _, cells = synthesize(vae, scdg, w, y, t_star=codes.t_star, guidance=codes.guidance, mode=mode)
    return cells.numpy().astype(np.float32)
