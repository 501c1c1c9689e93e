"""scDD code distillation: learn k latent codes per class that the frozen SCDG + decoder turn into cells."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
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
    iterations: int = -1  # -1: chosen from k (`resolve_iterations`)
    lr: float = 0.05
    t_star: int = -1  # -1: chosen from k (see `resolve_t_star`)
    guidance: float = 2.0
    init: Init = "real"
    latent_weight: float = 1.0  # mean matching in the encoder's latent space
    mmd_weight: float = 1.0  # RBF-MMD in the encoder's latent space
    gene_mean_weight: float = -1.0  # per-class gene-space mean matching; -1: chosen from k (`resolve_weights`)
    gene_weight: float = 0.0  # mean matching through random networks in gene space
    gm_weight: float = 0.0  # gradient matching on a random classifier (option)
    class_weight: float = 0.1  # QA-classifier cross-entropy on ẑ₀
    prior_weight: float = 0.1  # keeps codes on the noise shell of level t*
    real_batch: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1 or self.iterations < -1 or self.lr <= 0:
            msg = f"DistillConfig needs k >= 1, iterations >= 0 (or -1 = auto), lr > 0; got k={self.k}, iterations={self.iterations}, lr={self.lr}"
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


def resolve_iterations(cfg: DistillConfig) -> int:
    """Iterations from the config, or by k: 200 up to k = 10, 20 above.

    At k=10 the budget made no measurable difference in the multi-site benchmark (200 vs 60
    iterations: kang 0.865 vs 0.868, pbmc_sorted 0.788 vs 0.780, pbmc4k 0.794 vs 0.798);
    200 keeps one budget up to k = 10. Above, the per-iteration cost grows with k·C: 20.
    """
    if cfg.iterations >= 0:
        return cfg.iterations
    return 200 if cfg.k <= 10 else 20


def resolve_gene_mean_weight(cfg: DistillConfig) -> float:
    """Gene-space mean matching from the config, or by k: on for k <= 2 (prototypes), off above.

    Measured on kang (MLP, pooled pretraining): at k=1 it lifts accuracy 0.854 -> 0.926; at k=10
    it lowers it 0.913 -> 0.883 (codes collapse toward the mean). See benchmarks/README.md.
    """
    if cfg.gene_mean_weight >= 0:
        return cfg.gene_mean_weight
    return 1.0 if cfg.k <= 2 else 0.0


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
    params = [*vae.parameters(), *scdg.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        return _distill(vae, scdg, X, labels, cfg, t_star, gen, init_codes, progress)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def _distill(vae: VAE, scdg: SCDG, X: sp.csr_matrix | np.ndarray, labels: np.ndarray, cfg: DistillConfig, t_star: int, gen: torch.Generator, init_codes: Codes | None, progress: Callable[[int, int], None] | None) -> Codes:
    vae.eval()
    scdg.eval()
    classes = np.unique(labels)
    if init_codes is not None and set(np.unique(init_codes.labels)) == set(classes) and len(init_codes.labels) == cfg.k * len(classes):
        order = np.argsort(init_codes.labels, kind="stable")
        w0 = torch.as_tensor(init_codes.codes[order], dtype=torch.float32)
    else:
        w0 = None
    y_syn = torch.as_tensor(np.repeat(classes, cfg.k), dtype=torch.long)
    tg = _targets(vae, scdg, X, labels, y_syn)
    if w0 is None:
        w0 = _init_codes(scdg, tg.zs_real, labels, classes, cfg, t_star, gen)
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=cfg.lr)
    cfg = replace(cfg, gene_mean_weight=resolve_gene_mean_weight(cfg), iterations=resolve_iterations(cfg))
    for it in range(cfg.iterations):
        loss = _objective(vae, scdg, X, tg, w, y_syn, cfg, t_star, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None and (it % 20 == 0 or it == cfg.iterations - 1):
            progress(it + 1, cfg.iterations)
    return Codes(w.detach().numpy().astype(np.float32), y_syn.numpy().astype(np.int64), t_star, cfg.guidance)


@dataclass(frozen=True)
class _Targets:
    """What the real cells of a site contribute to the objective, computed once per distillation."""

    zs_real: torch.Tensor  # standardised encoder latents of all training cells
    pools: dict[int, np.ndarray]  # class id -> row indices
    latent_means: torch.Tensor  # (C_site, d) per-class mean of zs_real
    gene_means: torch.Tensor  # (C_site, G) per-class mean expression
    assign: torch.Tensor  # (C_site, n_codes) row-normalised class membership of the codes


def _targets(vae: VAE, scdg: SCDG, X: sp.csr_matrix | np.ndarray, labels: np.ndarray, y_syn: torch.Tensor) -> _Targets:
    zs_real = scdg.standardize(torch.from_numpy(encode(vae, X)))
    classes = [int(c) for c in np.unique(labels)]
    pools = {c: np.flatnonzero(labels == c) for c in classes}
    latent_means = torch.stack([zs_real[pools[c]].mean(0) for c in classes])
    gene_means = torch.stack([torch.from_numpy(np.asarray(X[pools[c]].mean(0), dtype=np.float32).ravel()) for c in classes])
    onehot = torch.stack([(y_syn == c).float() for c in classes])
    return _Targets(zs_real, pools, latent_means, gene_means, onehot / onehot.sum(1, keepdim=True))


def _objective(vae: VAE, scdg: SCDG, X: sp.csr_matrix | np.ndarray, tg: _Targets, w: torch.Tensor, y_syn: torch.Tensor, cfg: DistillConfig, t_star: int, gen: torch.Generator) -> torch.Tensor:
    """One iteration's loss: class means (latent, re-encoded latent, genes), MMD, class consistency, prior."""
    zs0, cells = synthesize(vae, scdg, w, y_syn, t_star=t_star, guidance=cfg.guidance)
    z_cells = scdg.standardize(vae.encode(cells)[0])
    total = cfg.class_weight * F.cross_entropy(scdg.classify(zs0), y_syn)
    total = total + cfg.prior_weight * (((w**2).mean(1) - 1.0) ** 2).mean()
    for z_syn in (zs0, z_cells):
        total = total + cfg.latent_weight * ((tg.assign @ z_syn - tg.latent_means) ** 2).sum()
    if cfg.gene_mean_weight > 0:
        total = total + cfg.gene_mean_weight * ((tg.assign @ cells - tg.gene_means) ** 2).sum()
    real_rows = {c: pool[torch.randint(len(pool), (min(cfg.real_batch, len(pool)),), generator=gen).numpy()] for c, pool in tg.pools.items()}
    if cfg.mmd_weight > 0 and cfg.k > 1:
        for c, idx in real_rows.items():
            total = total + cfg.mmd_weight * _mmd(tg.zs_real[idx[:128]], z_cells[y_syn == c])
    if cfg.gene_weight > 0 or cfg.gm_weight > 0:
        idx = np.concatenate(list(real_rows.values()))
        yr = torch.as_tensor(np.concatenate([np.full(len(v), c) for c, v in real_rows.items()]), dtype=torch.long)
        xr = dense_rows(X, idx)
        if cfg.gene_weight > 0:
            for c in tg.pools:
                total = total + cfg.gene_weight * _gene_dm(xr[yr == c], cells[y_syn == c], gen)
        if cfg.gm_weight > 0:
            total = total + cfg.gm_weight * _gradient_match(xr, yr, cells, y_syn, int(scdg.config.n_classes), gen)
    return total


def decode_mode(k: int) -> DecodeMode:
    """How codes become cells by default: expected expression for k <= 2, sampled detection above.

    One or two cells per class are prototypes: smooth expected expression. Above that, each
    gene's detection is drawn from the decoder's zero-inflation head, which gives a real-like
    zero fraction (0.71 vs 0.70 in kang's real cells) and, in the federation (FedAvg-pretrained
    generator, k=10), much higher accuracy: kang 0.881 / 0.894 (rounds 1 / 2) sampled vs
    0.801 / 0.791 expected, pbmc_ding 0.972 / 0.984 vs 0.944 / 0.960, and better or equal on the
    three other multi-site files. With a
    pooled-pretrained generator the two are closer and expected can win (pbmc4k k=10: 0.880
    expected vs 0.798 sampled; kang k=10: 0.868 both). `decode-mode` (run config) overrides it.
    """
    return "expected" if k <= 2 else "sample"


@torch.no_grad()
def generate(vae: VAE, scdg: SCDG, codes: Codes, *, mode: DecodeMode = "sample", seed: int = 0) -> np.ndarray:
    """Decode codes into synthetic log-normalised cells (n, G) float32.

    "expected" gives the decoder's mean expression (smooth cells, see `decode_mode`); "sample"
    draws each gene's detection from the decoder's zero-inflation head (real-like sparsity).
    """
    vae.eval()
    scdg.eval()
    w = torch.as_tensor(codes.codes, dtype=torch.float32)
    y = torch.as_tensor(codes.labels, dtype=torch.long)
    zs0 = scdg.one_step(w, codes.t_star, y, codes.guidance)
    gen = torch.Generator().manual_seed(seed)
    return vae.decode(scdg.unstandardize(zs0), mode=mode, generator=gen).numpy().astype(np.float32)
