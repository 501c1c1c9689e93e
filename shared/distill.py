"""scDD code distillation: learn k latent codes per class that the frozen SCDG + decoder turn into cells."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, cast

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from shared.errors import ConfigError
from shared.fitting import dense_rows, encode, model_device
from shared.models import SCDG, VAE
from shared.models.vae import DecodeMode

logger = logging.getLogger(__name__)

Init = Literal["real", "noise", "kmeans"]  # random cells' latents | pure noise | k-means centres of the latents


@dataclass(frozen=True)
class DistillConfig:
    """Objective weights and budget of code distillation at one site.

    The default objective is class consistency (the SCDG's latent classifier on ẑ₀) plus the
    noise-shell prior, with per-class gene-space mean matching added for k <= 2. Latent mean
    matching and MMD stay available but are off: on validation cells they score below the default
    and below no optimisation at all (`benchmarks/variants.py`, benchmarks/results/variants_validation.md).
    """

    k: int = 10
    iterations: int | None = None  # None: chosen from k (`resolve_iterations`)
    lr: float = 0.05
    t_star: int | None = None  # None: chosen from k (see `resolve_t_star`)
    guidance: float = 2.0
    init: Init = "real"
    latent_weight: float = 0.0  # class-mean matching in the encoder's latent space (option, off: see above)
    mmd_weight: float = 0.0  # RBF-MMD in the encoder's latent space (option)
    gene_mean_weight: float | None = None  # per-class gene-space mean matching; None: chosen from k
    gene_weight: float = 0.0  # mean matching through random networks in gene space
    gm_weight: float = 0.0  # gradient matching on a random classifier (option)
    class_weight: float = 1.0  # QA-classifier cross-entropy on ẑ₀
    decoded_class_weight: float = 0.0  # the VAE label head's cross-entropy on the re-encoded synthetic cells
    prior_weight: float = 0.1  # keeps codes on the noise shell of level t*
    real_batch: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1 or (self.iterations is not None and self.iterations < 0) or self.lr <= 0:
            msg = (
                "DistillConfig needs k >= 1, iterations >= 0 (or None = by k), lr > 0; "
                f"got k={self.k}, iterations={self.iterations}, lr={self.lr}"
            )
            raise ConfigError(msg)
        if self.init not in ("real", "noise", "kmeans"):
            msg = f"init must be 'real', 'noise' or 'kmeans', got {self.init!r}"
            raise ConfigError(msg)


def wire_fields(cfg: DistillConfig) -> dict[str, int | float | str | bool]:
    """The fields a distill request carries: those set (None, "the library chooses", stays at the site's default)."""
    return {key: value for key, value in dataclasses.asdict(cfg).items() if value is not None}


def resolve_t_star(cfg: DistillConfig, timesteps: int = 1000) -> int:
    """t* from the config, or by k: a higher level (more prototype-like) for very small k."""
    t = cfg.t_star if cfg.t_star is not None else (600 if cfg.k <= 2 else 400)
    if not 0 <= t < timesteps:
        msg = f"t_star must be in [0, {timesteps}), got {t}"
        raise ConfigError(msg)
    return t


def resolve_iterations(cfg: DistillConfig) -> int:
    """Iterations from the config, or by k: 200 up to k = 10, 20 above.

    At k = 10 the budget made no measurable difference (benchmarks/results/design_choices.md); 200
    keeps one budget up to k = 10. Above, the per-iteration cost grows with k·C: 20.
    """
    if cfg.iterations is not None:
        return cfg.iterations
    return 200 if cfg.k <= 10 else 20


def resolve_gene_mean_weight(cfg: DistillConfig, *, private: bool = False) -> float:
    """Gene-space mean matching from the config, or by k: on for k <= 2 (prototypes), off above; always on under DP.

    It helps prototypes (k <= 2) and hurts above, where codes collapse toward the class mean. Under DP
    (``private``) the noised class means are one cheap release and the strongest class signal left
    when DP-SGD noise blurs the generator's classifier. Measurements: benchmarks/results/design_choices.md.
    """
    if cfg.gene_mean_weight is not None:
        return cfg.gene_mean_weight
    return 1.0 if cfg.k <= 2 or private else 0.0


@dataclass(frozen=True)
class Codes:
    """Distilled codes of one site: (n, d) float32 codes and their global class ids."""

    codes: np.ndarray
    labels: np.ndarray
    t_star: int
    guidance: float
    # Rows (of the cells given to `distill_codes`) whose latents initialised the codes: kept at the site for the
    # seed-targeted privacy audit, never uploaded. With init="noise" they are the random cells drawn but not used.
    seed_rows: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of codes plus labels as they are uploaded (float32 codes, int32 labels)."""
        return int(self.codes.astype(np.float32).nbytes + self.labels.astype(np.int32).nbytes)


def code_counts(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The classes in `labels` and how many codes each gets: k, or its cell count where that is smaller.

    A class with 3 cells at a site gets 3 codes, not 50: no more codes than cells (as a real-cell
    coreset or gene-space DM at the same k), so the upload stays 1/20 of theirs at every k.
    """
    classes, n = np.unique(labels, return_counts=True)
    return classes, np.minimum(n, k)


ClassCounts = tuple[np.ndarray, np.ndarray]  # (class ids, codes per class)


def warm_start_fits(
    init: Codes, labels: np.ndarray, k: int, latent_dim: int, counts: ClassCounts | None = None
) -> bool:
    """Whether earlier codes can start this distillation: same latent size, classes and codes per class (``code_counts``
    unless given)."""
    classes, per_class = code_counts(labels, k) if counts is None else counts
    if init.codes.ndim != 2 or init.codes.shape[1] != latent_dim or len(init.labels) != init.codes.shape[0]:
        return False
    have, have_counts = np.unique(init.labels, return_counts=True)
    return bool(np.array_equal(have, classes) and np.array_equal(have_counts, per_class))


def _init_codes(
    scdg: SCDG,
    zs_real: torch.Tensor,
    y_real: np.ndarray,
    counts: dict[int, int],
    cfg: DistillConfig,
    t_star: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, np.ndarray]:
    """Initial codes (class by class) and the rows of the real cells they were drawn from.

    Noise-initialised codes draw the (unused, audit-only) rows from a generator of their own, so the
    codes' noise does not depend on how many cells a class has.
    """
    rows, picks = [], []
    pick_gen = torch.Generator().manual_seed(cfg.seed + 1) if cfg.init == "noise" else gen
    for c, n in counts.items():
        pool = np.flatnonzero(y_real == c)
        if cfg.init == "kmeans":
            start, pick = cluster_centres(zs_real[pool], n, cfg.seed + c)
            pick = pool[pick]
        else:
            pick = pool[torch.randperm(len(pool), generator=pick_gen)[:n].numpy()]
            start = zs_real[pick]
        picks.append(pick)
        noise = torch.randn(n, zs_real.shape[1], generator=gen).to(
            zs_real.device
        )  # drawn on CPU: the same codes on any device
        if cfg.init == "noise":
            rows.append(noise)
        else:
            t = torch.full((n,), t_star, dtype=torch.long, device=zs_real.device)
            rows.append(scdg.q_sample(start, t, noise))
    return torch.cat(rows), np.concatenate(picks).astype(np.int64)


KMEANS_MAX_CELLS = 20_000  # a larger class's centres are fitted on a sample of this many of its cells


def cluster_centres(zs: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` k-means centres of one class's latents, and for each a distinct row of a cell nearest to it (the cell the
    seed-targeted audit treats as its seed). scikit-learn's KMeans (k-means++ start, 3 restarts, seeded)."""
    z = zs.detach().cpu().numpy().astype(np.float64)
    if n >= len(z):
        return zs[:n], np.arange(min(n, len(z)))
    fit_on = z
    if len(z) > KMEANS_MAX_CELLS:  # a seeded sample: 100,000 cells took 16.6 s, 20,000 take a fifth of that
        fit_on = z[np.random.default_rng(seed).choice(len(z), KMEANS_MAX_CELLS, replace=False)]
    km = KMeans(n_clusters=n, n_init=3, random_state=seed).fit(fit_on)
    centres = torch.as_tensor(km.cluster_centers_, dtype=zs.dtype, device=zs.device)
    dist = km.transform(z)  # (cells, centres)
    nearest = np.empty(n, dtype=np.int64)
    for j in np.argsort(dist.min(0)):  # one distinct cell per centre, the closest centres choosing first
        nearest[j] = int(np.argmin(dist[:, j]))
        dist[nearest[j]] = np.inf
    return centres, nearest


def _mmd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RBF-MMD² with a median-heuristic bandwidth (computed without gradient)."""
    xy = torch.cat([a, b])
    d2 = torch.cdist(xy, xy) ** 2
    with torch.no_grad():
        bw = d2[d2 > 0].median() if (d2 > 0).any() else torch.tensor(1.0, device=d2.device)
    k = torch.exp(-d2 / bw.clamp(min=1e-6))
    n = a.shape[0]
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def _gene_dm(real: torch.Tensor, synth: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mean matching through a freshly drawn random 2-layer network in gene space."""
    g = real.shape[1]
    w1 = torch.randn(g, 256, generator=gen).to(real.device) / g**0.5
    w2 = torch.randn(256, 128, generator=gen).to(real.device) / 16.0
    emb = lambda x: F.relu(x @ w1) @ w2  # noqa: E731
    return ((emb(real).mean(0) - emb(synth).mean(0)) ** 2).sum()


def _gradient_match(
    real: torch.Tensor,
    y_real: torch.Tensor,
    synth: torch.Tensor,
    y_synth: torch.Tensor,
    n_classes: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """Layer-wise cosine distance between a random linear classifier's gradients on real and synthetic cells."""
    w = (torch.randn(real.shape[1], n_classes, generator=gen).to(real.device) * 0.01).requires_grad_(True)
    b = torch.zeros(n_classes, device=real.device, requires_grad=True)
    g_real = torch.autograd.grad(F.cross_entropy(real @ w + b, y_real), [w, b])
    g_syn = torch.autograd.grad(F.cross_entropy(synth @ w + b, y_synth), [w, b], create_graph=True)
    return cast(
        torch.Tensor,
        sum(
            1 - F.cosine_similarity(gr.detach().flatten(), gs.flatten(), dim=0)
            for gr, gs in zip(g_real, g_syn, strict=True)
        ),
    )


def synthesize(
    vae: VAE,
    scdg: SCDG,
    codes: torch.Tensor,
    labels: torch.Tensor,
    *,
    t_star: int,
    guidance: float,
    mode: DecodeMode = "expected",
) -> tuple[torch.Tensor, torch.Tensor]:
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
    counts: ClassCounts | None = None,
    gene_means: np.ndarray | None = None,
) -> Codes:
    """Distill cfg.k codes (at most the class's cell count) for every class in `labels` (global class ids) of a site.

    The generator and decoder are frozen; only the codes are optimised (Adam). Under DP the site
    gives the classes and codes per class (`counts`, from noised cell counts) and the per-class gene
    means (`gene_means`, (n_classes, G), a noised release) instead of computing them from the cells.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t_star = resolve_t_star(cfg, scdg.config.timesteps)
    params = [*vae.parameters(), *scdg.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        return _distill(vae, scdg, X, labels, cfg, t_star, gen, init_codes, progress, counts, gene_means)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def _distill(
    vae: VAE,
    scdg: SCDG,
    X: sp.csr_matrix | np.ndarray,
    labels: np.ndarray,
    cfg: DistillConfig,
    t_star: int,
    gen: torch.Generator,
    init_codes: Codes | None,
    progress: Callable[[int, int], None] | None,
    given: ClassCounts | None,
    gene_means: np.ndarray | None,
) -> Codes:
    vae.eval()
    scdg.eval()
    dev = model_device(vae)
    classes, counts = code_counts(labels, cfg.k) if given is None else given
    seeds = None
    if init_codes is not None and warm_start_fits(init_codes, labels, cfg.k, vae.config.latent_dim, (classes, counts)):
        order = np.argsort(init_codes.labels, kind="stable")
        w0 = torch.as_tensor(init_codes.codes[order], dtype=torch.float32).to(dev)
        seeds = None if init_codes.seed_rows is None else np.asarray(init_codes.seed_rows)[order]
    else:
        w0 = None
    y_syn = torch.as_tensor(np.repeat(classes, counts), dtype=torch.long).to(dev)
    tg = _targets(vae, scdg, X, labels, y_syn, [int(c) for c in classes], gene_means)
    if w0 is None:
        w0, seeds = _init_codes(
            scdg, tg.zs_real, labels, dict(zip(classes.tolist(), counts.tolist(), strict=True)), cfg, t_star, gen
        )
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=cfg.lr)
    iterations = resolve_iterations(cfg)
    cfg = replace(cfg, gene_mean_weight=resolve_gene_mean_weight(cfg), iterations=iterations)
    for it in range(iterations):
        loss = _objective(vae, scdg, X, tg, w, y_syn, cfg, t_star, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None and (it % 20 == 0 or it == iterations - 1):
            progress(it + 1, iterations)
    return Codes(
        w.detach().cpu().numpy().astype(np.float32), y_syn.cpu().numpy().astype(np.int64), t_star, cfg.guidance, seeds
    )


@dataclass(frozen=True)
class _Targets:
    """What the real cells of a site contribute to the objective, computed once per distillation."""

    zs_real: torch.Tensor  # standardised encoder latents of all training cells
    pools: dict[int, np.ndarray]  # class id -> row indices
    latent_means: torch.Tensor  # (C_site, d) per-class mean of zs_real
    gene_means: torch.Tensor  # (C_site, G) per-class mean expression
    assign: torch.Tensor  # (C_site, n_codes) row-normalised class membership of the codes


MEAN_BLOCK = (
    65_536  # cells: a larger class's mean is summed a block at a time (a hospital site's class is not copied whole)
)


def class_gene_means(X: sp.csr_matrix | np.ndarray, labels: np.ndarray, n_classes: int, min_cells: int) -> np.ndarray:
    """(n_classes, G) float32 gene means of each class's rows of ``X``; NaN rows for classes of fewer than
    ``min_cells`` rows (a mean of one or two cells comes close to describing them) and for absent classes."""
    out = np.full((n_classes, X.shape[1]), np.nan, dtype=np.float32)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if rows.size >= min_cells:
            out[c] = _rows_mean(X, rows)
    return out


def _rows_mean(X: sp.csr_matrix | np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(G,) float32 mean of the rows ``rows`` of X."""
    if rows.size <= MEAN_BLOCK:
        return np.asarray(X[rows].mean(0), dtype=np.float32).ravel()
    total = cast(
        np.ndarray,
        sum(
            np.asarray(X[rows[i : i + MEAN_BLOCK]].sum(0, dtype=np.float64)).ravel()
            for i in range(0, rows.size, MEAN_BLOCK)
        ),
    )
    return (total / rows.size).astype(np.float32)


def _targets(
    vae: VAE,
    scdg: SCDG,
    X: sp.csr_matrix | np.ndarray,
    labels: np.ndarray,
    y_syn: torch.Tensor,
    classes: list[int],
    released_means: np.ndarray | None,
) -> _Targets:
    dev = model_device(vae)
    zs_real = scdg.standardize(torch.from_numpy(encode(vae, X)).to(dev))
    pools = {c: np.flatnonzero(labels == c) for c in classes}
    latent_means = torch.stack(
        [zs_real[pools[c]].mean(0) if pools[c].size else torch.zeros(zs_real.shape[1], device=dev) for c in classes]
    )
    if released_means is not None:
        gene_means = torch.as_tensor(np.asarray(released_means, np.float32)[classes]).to(dev)
    else:
        gene_means = torch.stack([torch.from_numpy(_rows_mean(X, pools[c])) for c in classes]).to(dev)
    onehot = torch.stack([(y_syn == c).float() for c in classes])
    return _Targets(zs_real, pools, latent_means, gene_means, onehot / onehot.sum(1, keepdim=True))


def _objective(
    vae: VAE,
    scdg: SCDG,
    X: sp.csr_matrix | np.ndarray,
    tg: _Targets,
    w: torch.Tensor,
    y_syn: torch.Tensor,
    cfg: DistillConfig,
    t_star: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """One iteration's loss: class means (latent, re-encoded latent, genes), MMD, class consistency, prior."""
    zs0, cells = synthesize(vae, scdg, w, y_syn, t_star=t_star, guidance=cfg.guidance)
    mu_cells = vae.encode(cells)[0]
    z_cells = scdg.standardize(mu_cells)
    total = cfg.class_weight * F.cross_entropy(scdg.classify(zs0), y_syn)
    if cfg.decoded_class_weight > 0 and vae.label_head is not None:
        total = total + cfg.decoded_class_weight * F.cross_entropy(vae.label_head(mu_cells), y_syn)
    total = total + cfg.prior_weight * (((w**2).mean(1) - 1.0) ** 2).mean()
    for z_syn in (zs0, z_cells):
        total = total + cfg.latent_weight * ((tg.assign @ z_syn - tg.latent_means) ** 2).sum()
    gene_mean_weight = resolve_gene_mean_weight(cfg)  # resolved by the caller: the value itself
    if gene_mean_weight > 0:
        total = total + gene_mean_weight * ((tg.assign @ cells - tg.gene_means) ** 2).sum()
    real_rows = {
        c: pool[torch.randint(len(pool), (min(cfg.real_batch, len(pool)),), generator=gen).numpy()]
        for c, pool in tg.pools.items()
    }
    if cfg.mmd_weight > 0 and cfg.k > 1:
        for c, idx in real_rows.items():
            total = total + cfg.mmd_weight * _mmd(tg.zs_real[idx[:128]], z_cells[y_syn == c])
    if cfg.gene_weight > 0 or cfg.gm_weight > 0:
        idx = np.concatenate(list(real_rows.values()))
        yr = torch.as_tensor(np.concatenate([np.full(len(v), c) for c, v in real_rows.items()]), dtype=torch.long).to(
            cells.device
        )
        xr = dense_rows(X, idx).to(cells.device)
        if cfg.gene_weight > 0:
            for c in tg.pools:
                total = total + cfg.gene_weight * _gene_dm(xr[yr == c], cells[y_syn == c], gen)
        if cfg.gm_weight > 0:
            total = total + cfg.gm_weight * _gradient_match(xr, yr, cells, y_syn, int(scdg.config.n_classes), gen)
    return total


# How codes become cells by default: the decoder's expected expression, at every k.
#
# Expected vs sampled detection on validation cells: benchmarks/results/variants_validation.md.
# Sampled detection gives a real-like zero fraction but costs accuracy; it stays available as
# `decode-mode = "sample"` (run config) or ``generate(mode="sample")``.
DECODE_MODE: DecodeMode = "expected"


@torch.no_grad()
def latents(scdg: SCDG, codes: Codes) -> np.ndarray:
    """The generator's one-step latents ẑ0 (n, d) of the codes, on the VAE's latent scale (what the decoder reads)."""
    scdg.eval()
    w = torch.as_tensor(codes.codes, dtype=torch.float32)
    y = torch.as_tensor(codes.labels, dtype=torch.long)
    return scdg.unstandardize(scdg.one_step(w, codes.t_star, y, codes.guidance)).numpy()


@torch.no_grad()
def generate(vae: VAE, scdg: SCDG, codes: Codes, *, mode: DecodeMode = DECODE_MODE, seed: int = 0) -> np.ndarray:
    """Decode codes into synthetic log-normalised cells (n, G) float32.

    "expected" gives the decoder's mean expression (smooth cells, the default, see `DECODE_MODE`); "sample"
    draws each gene's detection from the decoder's zero-inflation head (real-like sparsity).
    """
    vae.eval()
    scdg.eval()
    w = torch.as_tensor(codes.codes, dtype=torch.float32)
    y = torch.as_tensor(codes.labels, dtype=torch.long)
    zs0 = scdg.one_step(w, codes.t_star, y, codes.guidance)
    gen = torch.Generator().manual_seed(seed)
    return vae.decode(scdg.unstandardize(zs0), mode=mode, generator=gen).numpy().astype(np.float32)
