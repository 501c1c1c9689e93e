"""The run's differential-privacy settings, as every site receives them (part of the SiteSpec)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from shared.errors import ConfigError
from shared.privacy.accounting import DELTA_REF, NAMES_DELTA_SHARE, Schedule, SGDStage, scales_for

MAX_DELTA = 1e-2  # a delta above this is no guarantee worth the name


@dataclass(frozen=True)
class DPSpec:
    """Cell-level DP of a run: the target epsilon and everything a site needs to plan its releases.

    The pretraining schedule is part of it: a site composes the DP-SGD steps it was promised and
    refuses requests beyond them (``shared.privacy.ledger``).
    """

    epsilon: float = 0.0  # 0 = off
    delta: float | None = None  # None: 1 / (10 x the site's training cells), from the site's noised cell count
    max_grad_norm: float = 1.0  # DP-SGD: each cell's gradient is clipped to this L2 norm
    run_key: str = (
        ""  # the run's name: noise is drawn from a site secret keyed by it (a resumed run re-releases nothing new)
    )
    rounds: int = 0  # FedAvg rounds of each stage
    vae_steps: int = 0  # local DP-SGD steps per round
    vae_batch: int = 0  # expected cells per step
    scdg_steps: int = 0
    scdg_batch: int = 0
    class_means: bool = False  # distillation matches per-class gene means (k <= 2): one more released statistic
    # sites with count input release per-class library statistics (what synthetic counts are sampled with); off when
    # the models get no count head (statistics pretraining), so that no epsilon is spent on a release nothing reads
    library_stats: bool = True

    @property
    def enabled(self) -> bool:
        """DP is on."""
        return self.epsilon > 0

    def items(self) -> dict[str, Any]:
        """Wire items (prefixed ``dp-``)."""
        return {
            "dp-epsilon": float(self.epsilon),
            "dp-delta": float(self.delta or 0.0),  # the wire has no null: 0 stands for None
            "dp-max-grad-norm": float(self.max_grad_norm),
            "dp-run-key": self.run_key,
            "dp-rounds": int(self.rounds),
            "dp-vae-steps": int(self.vae_steps),
            "dp-vae-batch": int(self.vae_batch),
            "dp-scdg-steps": int(self.scdg_steps),
            "dp-scdg-batch": int(self.scdg_batch),
            "dp-class-means": bool(self.class_means),
            "dp-library-stats": bool(self.library_stats),
        }

    @classmethod
    def from_items(cls, rec: Any, get: Any) -> DPSpec:
        """Decode from wire items with ``get(rec, key, type)``; ConfigError when out of range."""
        spec = cls(
            get(rec, "dp-epsilon", float),
            get(rec, "dp-delta", float) or None,
            get(rec, "dp-max-grad-norm", float),
            get(rec, "dp-run-key", str),
            get(rec, "dp-rounds", int),
            get(rec, "dp-vae-steps", int),
            get(rec, "dp-vae-batch", int),
            get(rec, "dp-scdg-steps", int),
            get(rec, "dp-scdg-batch", int),
            get(rec, "dp-class-means", bool),
            get(rec, "dp-library-stats", bool),
        )
        spec.check()
        return spec

    def check(self) -> None:
        """ConfigError with what is wrong and the allowed range."""
        if not math.isfinite(self.epsilon) or self.epsilon < 0:
            msg = f"dp-epsilon must be >= 0 (0 = off), got {self.epsilon}"
            raise ConfigError(msg)
        if not self.enabled:
            return
        if self.delta is not None and not 0 < self.delta <= MAX_DELTA:
            msg = (
                f"dp-delta must be in (0, {MAX_DELTA}] (or auto: 1 / (10 x training cells) per site), got {self.delta}"
            )
            raise ConfigError(msg)
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            msg = f"dp-max-grad-norm must be > 0, got {self.max_grad_norm}"
            raise ConfigError(msg)
        if min(self.rounds, self.vae_steps, self.vae_batch, self.scdg_steps, self.scdg_batch) < 0 or not self.run_key:
            msg = "the DP plan needs a run key and non-negative rounds, steps and batch sizes"
            raise ConfigError(msg)

    def names_delta(self) -> float:
        """The delta spent on releasing label names above a noise threshold (public: not from the site's cells)."""
        return NAMES_DELTA_SHARE * (DELTA_REF / 10 if self.delta is None else self.delta)

    def site_delta(self, n_cells: float) -> float:
        """The delta of a site with ``n_cells`` (noised) training cells."""
        return min(MAX_DELTA, 1.0 / (10.0 * max(n_cells, 1.0))) if self.delta is None else self.delta

    def schedule(self, n_cells: float, *, has_counts: bool) -> Schedule:
        """Every release of a site with ``n_cells`` (noised) training cells over the run."""
        one_shot = ["profile gene statistics", "label counts"]
        if self.rounds > 0:  # without DP-SGD rounds the server takes its latent moments from the models it trained
            one_shot.append("latent moments")
        if has_counts and self.library_stats:
            one_shot.append("library statistics")
        if self.class_means:
            one_shot.append("class gene means")
        n = max(n_cells, 1.0)
        sgd = (
            SGDStage("VAE", self.rounds * self.vae_steps, min(1.0, self.vae_batch / n)),
            SGDStage("SCDG", self.rounds * self.scdg_steps, min(1.0, self.scdg_batch / n)),
        )
        with_sgd = any(st.steps > 0 for st in sgd)
        return Schedule(tuple(one_shot), sgd, scales_for(tuple(one_shot), with_sgd=with_sgd))
