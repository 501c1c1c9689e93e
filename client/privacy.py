"""What a site releases under cell-level DP (run config ``dp-epsilon`` > 0): noised statistics, DP-SGD settings, its
report.

Every number here that leaves the site is a Gaussian mechanism on clipped per-cell contributions
(``shared.privacy.mechanisms``), DP-SGD (``shared.privacy.sgd``) or computed from those. Noise is
keyed by (run, site, release): recomputing a release in a later message gives the same values, so
the label counts released in the profile also serve as the cell counts of every later message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from client.site import SiteData, SiteProfile
from shared.errors import ProtocolError, SiteDataError
from shared.privacy import ledger
from shared.privacy import mechanisms as mech
from shared.privacy.accounting import PRIMARY, Noise, Schedule, epsilon, release_noise, site_calibration
from shared.privacy.denoise import soft_threshold_means
from shared.privacy.sgd import DPSGD
from shared.privacy.spec import DPSpec
from shared.protocol import Plan, ProfileReply
from shared.protocol.rounds import LIBRARY_STATS

SQRT3 = math.sqrt(3.0)
# per latent dimension (posterior means of a VAE with a standard-normal prior); sqrt(d) x this clips a cell's latent
LATENT_BOUND = 3.0
MIN_CELLS = 5  # classes with fewer (noised) cells get the site's pooled library statistics, as without DP


@dataclass(frozen=True)
class SiteDP:
    """A site's DP context in one run: the settings, its noise secret and its private cache (the ledger)."""

    spec: DPSpec
    secret: bytes
    cache: Path
    site_key: str  # the site's identity (data source): noise and ledger entries are per site

    def rng(self, what: str) -> np.random.Generator:
        """The generator of one release."""
        return mech.noise_rng(self.secret, [self.spec.run_key, self.site_key, what])

    def claim(self, slot: str, content: str) -> None:
        """Refuse a second, different release of ``slot`` in this run (``shared.privacy.ledger``)."""
        ledger.claim(self.cache, self.site_key, self.spec.run_key, slot, content)


def _one_shot_sigma(site: SiteData | SiteProfile, dp: SiteDP, name: str) -> float:
    return release_noise(dp.spec.epsilon, dp.spec.schedule(1.0, has_counts=site.has_counts), name)


def label_counts(site: SiteData | SiteProfile, dp: SiteDP) -> dict[str, int]:
    """Training cells per label, noised; only labels whose noised count passes the threshold
    (``mechanisms.name_threshold``)."""
    sigma = _one_shot_sigma(site, dp, "label counts")
    y = site.labels[site.train_idx]
    noised = mech.noisy_counts(y, len(site.classes), sigma, dp.rng("label counts"))
    tau = mech.name_threshold(sigma, dp.spec.names_delta())
    present = (
        np.bincount(y, minlength=len(site.classes)) > 0
    )  # a label never seen here is not a name this site can release
    return {
        c: max(1, round(float(v))) for c, v, ok in zip(site.classes, noised, present, strict=True) if ok and v >= tau
    }


def plan_counts(site: SiteData, plan: Plan, dp: SiteDP) -> np.ndarray:
    """(C,) noised training cells per plan class (0 for classes this site did not release)."""
    counts = label_counts(site, dp)
    return np.array([counts.get(c, 0) for c in plan.classes], dtype=np.int64)


def profile(site: SiteProfile, dp: SiteDP) -> ProfileReply:
    """The profile under DP: per-gene sums, sums of squares and detection counts from one Gaussian release, noised label
    counts."""
    if site.clipped.shape[0] != len(mech.PROFILE_BOUNDS):
        msg = "the site's profile statistics were computed without DP clipping; prepare them again with DP on"
        raise SiteDataError(msg)
    sigma = _one_shot_sigma(site, dp, "profile gene statistics")
    rng = dp.rng("profile gene statistics")
    out = []
    for part, bound in zip(site.clipped, mech.PROFILE_BOUNDS, strict=True):
        noised = part + rng.normal(0.0, sigma, part.shape[0])
        out.append(np.maximum(noised * bound * SQRT3, 0.0))
    counts = label_counts(site, dp)
    if not counts:
        tau = mech.name_threshold(_one_shot_sigma(site, dp, "label counts"), dp.spec.names_delta())
        msg = (
            f"under DP (dp-epsilon={dp.spec.epsilon:g}) no cell type of this site passes the release threshold "
            f"of about {tau:.0f} training cells after noise; raise dp-epsilon or leave this site out"
        )
        raise SiteDataError(msg)
    names = tuple(sorted(counts))
    n = int(sum(counts.values()))
    return ProfileReply(
        site.name,
        tuple(site.genes),
        out[0],
        out[1],
        np.clip(np.rint(out[2]), 0, n).astype(np.int64),
        n,
        names,
        np.array([counts[n] for n in names], dtype=np.int64),
        has_counts=site.has_counts,
    )


@dataclass(frozen=True)
class Budget:
    """A site's calibrated releases for the run."""

    n_cells: float  # noised training cells of the plan's classes
    delta: float  # the accountant's delta (the label-name threshold's delta comes on top)
    schedule: Schedule
    noise: Noise

    def sigma(self, name: str) -> float:
        """The noise multiplier of one-shot release ``name``."""
        return self.noise.stats * self.schedule.scale(name)


def budget(site: SiteData, plan: Plan, dp: SiteDP) -> Budget:
    """Noise multipliers that meet the run's epsilon at this site (ConfigError when they cannot)."""
    n = float(plan_counts(site, plan, dp).sum())
    if n < 1:
        msg = "no released training cells of the plan's classes at this site"
        raise ProtocolError(msg)
    delta = dp.spec.site_delta(n)
    schedule = dp.spec.schedule(n, has_counts=site.has_counts)
    return Budget(n, delta, *site_calibration(dp.spec.epsilon, delta, schedule))


def dp_sgd(b: Budget, batch: int, max_grad_norm: float) -> DPSGD:
    """The DP-SGD settings of one stage: Poisson rate batch / (noised cells), the calibrated noise."""
    rate = min(1.0, batch / b.n_cells)
    return DPSGD(b.noise.sgd, max_grad_norm, rate, rate * b.n_cells)


def check_pretrain(dp: SiteDP, stage: str, rnd: int, steps: int, batch: int, content: str) -> None:
    """A pretraining request must be one of the rounds the DP plan promised, once (ProtocolError otherwise)."""
    spec = dp.spec
    want = {"vae": (spec.vae_steps, spec.vae_batch), "scdg": (spec.scdg_steps, spec.scdg_batch)}.get(stage)
    if stage == "latent-stats" and spec.rounds > 0:
        dp.claim("latent-stats", content)
        return
    if stage == "class-means" and spec.class_means:  # the release distillation matches; claimed by class_means_release
        return
    if stage in ("latent-stats", "class-means"):
        msg = f"refused: a {stage} release is not part of the run's DP plan"
        raise ProtocolError(msg)
    if want is None or not 1 <= rnd <= spec.rounds or (steps, batch) != want:
        msg = (
            f"refused: {stage} round {rnd} with {steps} steps of batch {batch} is outside the run's DP plan "
            f"({spec.rounds} rounds of {want[0] if want else 0} steps, batch {want[1] if want else 0})"
        )
        raise ProtocolError(msg)
    dp.claim(f"{stage}-{rnd}", content)


def latent_moments(Z: np.ndarray, dp: SiteDP, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Sums of latents and of their squares from one Gaussian release (each cell's two vectors clipped)."""
    d = Z.shape[1]
    b1, b2 = LATENT_BOUND * math.sqrt(d), LATENT_BOUND**2 * math.sqrt(d)
    V = np.hstack([mech.clip_rows(Z, b1) / (b1 * math.sqrt(2)), mech.clip_rows(Z**2, b2) / (b2 * math.sqrt(2))])
    noised = mech.noisy_class_sums(V, np.zeros(len(Z), np.int64), 1, sigma, dp.rng("latent moments"))[0]
    return noised[:d] * b1 * math.sqrt(2), np.maximum(noised[d:] * b2 * math.sqrt(2), 0.0)


def library_stats(
    X: sp.csr_matrix, library: np.ndarray, y: np.ndarray, counts: np.ndarray, dp: SiteDP, sigma: float
) -> np.ndarray:
    """(C, 3) per-class mean and sd of log total counts and mean plan share, from one Gaussian release (NaN: class not
    released)."""
    from shared.counts import plan_fraction

    n_classes = len(counts)
    log_l = (
        np.clip(np.log(np.maximum(np.asarray(library, np.float64), 1.0)), 0.0, mech.LOG_LIBRARY_MAX)
        / mech.LOG_LIBRARY_MAX
    )
    share = np.clip(plan_fraction(X), 0.0, 1.0)
    V = np.stack([log_l, log_l**2, share], axis=1) / SQRT3  # each part <= 1/sqrt(3)
    sums = mech.noisy_class_sums(V, y, n_classes, sigma, dp.rng("library statistics")) * SQRT3
    out = np.full((n_classes, LIBRARY_STATS), np.nan, np.float32)
    pooled_n = max(float(counts.sum()), 1.0)
    rows = {c: (sums[c], max(float(counts[c]), 1.0)) for c in range(n_classes) if counts[c] >= MIN_CELLS}
    pooled = (sums[counts > 0].sum(0), pooled_n)
    for c in np.flatnonzero(counts > 0):
        s, n = rows.get(int(c), pooled)
        m1, m2 = s[0] / n, s[1] / n
        mean = float(np.clip(m1, 0.0, 1.0))
        # a value within [0, 1] has a standard deviation of at most 1/2: the noised second moment of a small class
        # can imply more, which the coordinator rightly refuses (a site was dropped from distillation for it)
        sd = min(math.sqrt(max(float(m2) - mean**2, 0.0)), 0.5)
        out[c] = (mean * mech.LOG_LIBRARY_MAX, sd * mech.LOG_LIBRARY_MAX, float(np.clip(s[2] / n, 1e-6, 1.0)))
    return out


def class_gene_sums(
    X: sp.csr_matrix, y: np.ndarray, n_classes: int, dp: SiteDP, sigma: float, center: np.ndarray | None = None
) -> np.ndarray:
    """(C, G) per-class sums plus Gaussian noise of sd sigma x the clip bound per entry: the release (one cell moves it
    by at most the bound in L2).

    Without ``center`` each cell is clipped to L2 norm GENE_NORM. With the plan's center (all sites' mean cell) each
    cell's difference to it is clipped to CENTERED_NORM instead: those differences are shorter than the cells, so the
    same epsilon buys less noise. The release is then the sum of the clipped differences.
    """
    dense = np.asarray(X.toarray(), np.float64)
    rng = dp.rng("class gene means")
    if center is None:
        return mech.noisy_class_sums(dense / mech.GENE_NORM, y, n_classes, sigma, rng) * mech.GENE_NORM
    return mech.noisy_class_sums((dense - center) / mech.CENTERED_NORM, y, n_classes, sigma, rng) * mech.CENTERED_NORM


def class_gene_means(
    X: sp.csr_matrix,
    y: np.ndarray,
    counts: np.ndarray,
    dp: SiteDP,
    sigma: float,
    center: np.ndarray | None = None,
    *,
    raw: bool = False,
) -> np.ndarray:
    """(C, G) per-class mean expression from the ``class_gene_sums`` release and the released ``counts``: denoised at
    this site alone (``shared.privacy.denoise.soft_threshold_means``), or with ``raw`` the noised sums over the counts
    as they are (what the coordinator denoises with every site's release, ``joint_denoise``); rows of unreleased classes
    are 0."""
    counts = np.asarray(counts)
    sums = class_gene_sums(X, y, len(counts), dp, sigma, center)
    if center is not None:  # back to sums of cells, with the released counts (post-processing)
        sums = sums + counts[:, None].astype(np.float64) * np.asarray(center, np.float64)
    if raw:
        out = np.zeros_like(sums)
        released = counts > 0
        out[released] = sums[released] / counts[released, None]
        return out.astype(np.float32)
    return soft_threshold_means(sums, counts, sigma * mech.class_sums_bound(center)).astype(np.float32)


def class_means_release(
    X: sp.csr_matrix, y: np.ndarray, counts: np.ndarray, plan: Plan, dp: SiteDP, b: Budget, *, raw: bool = False
) -> np.ndarray:
    """The site's one release of per-class gene means in this run (pretraining and distillation both use it; the same
    noise, no extra cost; ``raw``: see ``class_gene_means``). The ledger ties it to the plan: the same noise over other
    genes or around another center would let the coordinator subtract two releases, so a second plan is refused."""
    dp.claim("class-means", plan.digest())
    center = np.asarray(plan.center, np.float64) if plan.center else None
    return class_gene_means(X, y, counts, dp, b.sigma(PRIMARY), center, raw=raw)


def report(b: Budget, dp: SiteDP) -> dict[str, object]:
    """What the accountant says this site spent in the run: epsilon at delta (plus the label threshold's delta), and the
    mechanisms."""
    eps = epsilon(b.schedule, b.noise, b.delta)
    mechanisms = [f"Gaussian (noise multiplier {b.sigma(name):.3g}): {name}" for name in b.schedule.one_shot]
    mechanisms += [
        f"DP-SGD {st.name}: {st.steps} steps, Poisson rate {st.sample_rate:.4g}, noise multiplier {b.noise.sgd:.3g}, "
        f"clip {dp.spec.max_grad_norm:g}"
        for st in b.schedule.sgd
        if st.steps
    ]
    return {
        "epsilon": eps,
        "delta": b.delta + dp.spec.names_delta(),
        "mechanisms": mechanisms,
        "noise_multiplier_sgd": b.noise.sgd,
        "noise_multiplier_stats": b.noise.stats,
    }
