"""Cell-level (epsilon, delta) accounting of everything one site releases in a run.

The unit of privacy is one training cell of one site: two datasets are neighbours when they differ
by adding or removing one cell. A site releases, per run,

- a few one-shot Gaussian releases of clipped statistics (the profile's gene statistics and label
  counts, the latent moments, the library statistics of count input, per-class gene means when the
  objective uses them), each with noise multiplier ``Noise.stats`` relative to its L2 sensitivity;
- DP-SGD steps for the VAE and the SCDG (Poisson sampling at rate q, per-cell clipping, Gaussian
  noise with multiplier ``Noise.sgd``).

Everything else it sends is computed from these (post-processing: no further cost). The accountant
is the Renyi-DP accountant of Google's ``dp-accounting`` (Mironov 2017; Mironov, Talwar, Zhang 2019
for the sampled Gaussian), which composes all of them into one epsilon at the site's delta.

Calibration: the one-shot statistics get ``STATS_SHARE`` of the target epsilon (their noise does not
depend on the site's cell count, which is itself private), DP-SGD the rest; the epsilon a site
reports is what the accountant computes for the whole composition, not the target. Without DP-SGD
(``dp-pretraining = "statistics"``) everything the federation learns comes from one release, the
per-class gene means: the other one-shot releases then get ``SUPPORT_SCALE`` times its noise, so
that most of the budget goes where the accuracy is made (``Schedule.scales``).

The one-shot noise is calibrated at a public delta (``DELTA_REF``) because the first releases (the profile and the
label counts) are made before the site's cell count, and so its delta, is public. Without DP-SGD the class means are
released after it: ``spend_rest`` sets their noise so that the whole run spends the target at the site's delta
(computed from the released counts: post-processing), instead of leaving up to 30 % of the budget unspent at small
sites and overspending at sites of over 10,000 cells.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from shared.errors import ConfigError

STATS_SHARE = 0.25  # share of the target epsilon spent on the one-shot statistics
DELTA_REF = 1e-5  # delta at which the one-shot noise is calibrated (public: it must not depend on the site's cells)
MAX_SGD_NOISE = 30.0  # a plan that needs more DP-SGD noise than this learns nothing: refused as unreachable
NAMES_DELTA_SHARE = 0.1  # share of delta for releasing a label name only above a noise threshold (see mechanisms)
# Integer Renyi orders: the sampled Gaussian's RDP has a closed form there (fractional orders need a series that
# does not converge at high sampling rates, and small sites train at rates near 1).
ORDERS = (*range(2, 129), 160, 192, 256, 384, 512, 1024)
PRIMARY = "class gene means"  # without DP-SGD, the release every model and code is fitted to
# Without DP-SGD, each other one-shot release (plan profile, label counts) gets this many times the class means' noise.
# 2 was compared with 1 (the even split) on validation cells; 1.5 to 8 were screened offline later (3-4 gain about 0.008
# there), and 3 in the federation (paired, 15 runs: validation MLP +0.010 at epsilon 8, but -0.030 / LR -0.043 at
# epsilon 2, where a label name then needs 38 cells instead of 28; benchmarks/results/dp_curve.md). The composition
# stays exact.
SUPPORT_SCALE = 2.0


@dataclass(frozen=True)
class SGDStage:
    """One DP-SGD stage of a run: ``steps`` noisy steps at Poisson sampling rate ``sample_rate``."""

    name: str
    steps: int
    sample_rate: float


@dataclass(frozen=True)
class Schedule:
    """Everything one site releases in a run, as the accountant sees it."""

    one_shot: tuple[str, ...]  # names of the one-shot Gaussian releases
    sgd: tuple[SGDStage, ...] = ()
    scales: tuple[float, ...] = ()  # each one-shot release's noise / Noise.stats (empty: all 1)

    def scale(self, name: str) -> float:
        """The noise of one-shot release ``name`` relative to ``Noise.stats``."""
        if name not in self.one_shot:
            msg = f"{name!r} is not a release of this schedule ({', '.join(self.one_shot)})"
            raise KeyError(msg)
        return self.scales[self.one_shot.index(name)] if self.scales else 1.0


def scales_for(one_shot: tuple[str, ...], *, with_sgd: bool) -> tuple[float, ...]:
    """The one-shot releases' relative noise: ``SUPPORT_SCALE`` for all but PRIMARY when it is there and there is no
    DP-SGD, else 1 for all."""
    if with_sgd or PRIMARY not in one_shot:
        return ()
    return tuple(1.0 if name == PRIMARY else SUPPORT_SCALE for name in one_shot)


@dataclass(frozen=True)
class Noise:
    """Noise multipliers (noise standard deviation / L2 sensitivity) of a site's releases."""

    stats: float
    sgd: float


def _event(schedule: Schedule, noise: Noise):  # noqa: ANN202 - a dp_accounting DpEvent
    import dp_accounting as dpa  # imported here: only DP runs pay for it

    events = [dpa.GaussianDpEvent(noise.stats * schedule.scale(name)) for name in schedule.one_shot]
    for st in schedule.sgd:
        if st.steps > 0:
            q = min(1.0, st.sample_rate)
            events.append(
                dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(noise.sgd)), st.steps)
            )
    return dpa.ComposedDpEvent(events)


def epsilon(schedule: Schedule, noise: Noise, delta: float) -> float:
    """The epsilon of the whole schedule at ``delta`` (Renyi-DP composition, then conversion)."""
    from dp_accounting import rdp

    if not 0 < delta < 1:
        msg = f"delta must be in (0, 1), got {delta}"
        raise ConfigError(msg)
    acc = rdp.RdpAccountant(orders=list(ORDERS))
    acc.compose(_event(schedule, noise))
    return float(acc.get_epsilon(delta))


def _smallest(fits, lo: float, hi: float, rel: float = 1e-3) -> float:  # noqa: ANN001 - callable(float) -> bool
    """The smallest x in [lo, hi] with fits(x), to a relative ``rel`` (fits is monotone: false below, true above);
    bisection in log space."""
    while hi / lo > 1 + rel:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


@functools.lru_cache(maxsize=64)
def stats_noise(target: float, n_releases: int, share: float = STATS_SHARE, scales: tuple[float, ...] = ()) -> float:
    """``Noise.stats`` such that ``n_releases`` one-shot releases (noise ``scales[i]`` x it; all 1 when empty) spend
    ``share * target`` at DELTA_REF."""
    if n_releases == 0:
        return 0.0
    sched = Schedule(tuple(f"r{i}" for i in range(n_releases)), (), scales)
    return _smallest(lambda s: epsilon(sched, Noise(s, 1.0), DELTA_REF) <= share * target, 1e-2, 1e5)


def one_shot_noise(target: float, schedule: Schedule) -> float:
    """The one-shot releases' noise multiplier: their share of ``target`` (all of it without DP-SGD); independent of the
    site's cells."""
    has_sgd = any(st.steps > 0 for st in schedule.sgd)
    return stats_noise(target, len(schedule.one_shot), STATS_SHARE if has_sgd else 1.0, schedule.scales)


def release_noise(target: float, schedule: Schedule, name: str) -> float:
    """The noise multiplier of one-shot release ``name`` (public: it does not depend on the site's cells)."""
    return one_shot_noise(target, schedule) * schedule.scale(name)


@functools.lru_cache(maxsize=64)
def spend_rest(target: float, delta: float, schedule: Schedule) -> Schedule:
    """``schedule`` with the class means' noise set so that the run spends ``target`` at ``delta``.

    Only without DP-SGD, and only the class means (PRIMARY): they are released after the label counts, so their noise
    may depend on the site's released cell count through ``delta``; every other release keeps its public noise (the
    profile and label counts must, they come first). A site's delta is above DELTA_REF below 10,000 training cells:
    the class means then get less noise. Above, they get more: calibrated at DELTA_REF alone, such a site would spend
    more than the target (8.23 at epsilon 8 for 20,000 cells).
    """
    if any(st.steps > 0 for st in schedule.sgd) or PRIMARY not in schedule.one_shot:
        return schedule
    base = one_shot_noise(target, schedule)
    scales = tuple(schedule.scale(name) for name in schedule.one_shot)
    at = schedule.one_shot.index(PRIMARY)

    def with_primary(rel: float) -> Schedule:
        return Schedule(schedule.one_shot, schedule.sgd, (*scales[:at], rel, *scales[at + 1 :]))

    primary, hi = scales[at], 1e3 * scales[at]
    if epsilon(with_primary(hi), Noise(base, 0.0), delta) > target:  # the other releases alone spend more
        msg = f"dp-epsilon={target:g} cannot be met at delta {delta:.3g} by the one-shot releases; raise dp-delta"
        raise ConfigError(msg)
    rel = _smallest(lambda r: epsilon(with_primary(r), Noise(base, 0.0), delta) <= target, 1e-3 * primary, hi)
    return with_primary(rel)


@functools.lru_cache(maxsize=64)  # every message of a run asks again with the same numbers
def calibrate(target: float, delta: float, schedule: Schedule) -> Noise:
    """The noise that meets ``(target, delta)`` for ``schedule``; ConfigError when DP-SGD would need more than
    MAX_SGD_NOISE."""
    if not math.isfinite(target) or target <= 0:
        msg = f"dp-epsilon must be a positive number, got {target}"
        raise ConfigError(msg)
    sig_stats = one_shot_noise(target, schedule)
    if not any(st.steps > 0 for st in schedule.sgd):
        return Noise(sig_stats, 0.0)
    if epsilon(schedule, Noise(sig_stats, MAX_SGD_NOISE), delta) > target:
        steps = " + ".join(
            f"{st.steps} {st.name} steps at sampling rate {st.sample_rate:.3g}" for st in schedule.sgd if st.steps
        )
        msg = (
            f"dp-epsilon={target:g} cannot be met: {steps} would need a DP-SGD noise multiplier "
            f"above {MAX_SGD_NOISE:g}; raise dp-epsilon, or lower num-pretrain-rounds, the local steps "
            "or the batch sizes"
        )
        raise ConfigError(msg)
    sig = _smallest(lambda s: epsilon(schedule, Noise(sig_stats, s), delta) <= target, 0.05, MAX_SGD_NOISE)
    return Noise(sig_stats, sig)


def site_calibration(target: float, delta: float, schedule: Schedule) -> tuple[Schedule, Noise]:
    """What a site releases with: the noise ``calibrate`` gives ``schedule``, and the schedule with the class means'
    share set by ``spend_rest``; ConfigError (from either) when the target cannot be met."""
    noise = calibrate(target, delta, schedule)
    return spend_rest(target, delta, schedule), noise
