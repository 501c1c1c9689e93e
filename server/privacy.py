"""The coordinator's side of cell-level DP: refuse a plan the sites cannot meet, check what the sites report."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from shared.errors import ConfigError, ProtocolError
from shared.privacy.accounting import PRIMARY, site_calibration
from shared.protocol import Plan, ProfileReply


def privacy_plan(profiles: Sequence[ProfileReply], plan: Plan) -> dict[str, dict[str, float]]:
    """Per site, the noise its accountant will need for the run's epsilon (from its released, noised cell counts).

    The sites compute the same from the same released numbers; this runs before pretraining so that
    an epsilon no site can meet stops the run before anything is trained (ConfigError naming the site).
    """
    spec = plan.spec.dp
    out = {}
    for p in sorted(profiles, key=lambda q: q.site_name):
        n = float(sum(int(c) for name, c in zip(p.label_names, p.label_counts, strict=True) if name in plan.classes))
        delta = spec.site_delta(n)
        try:
            schedule, noise = site_calibration(spec.epsilon, delta, spec.schedule(n, has_counts=p.has_counts))
        except ConfigError as exc:
            msg = f"site {p.site_name} ({n:.0f} cells after noise): {exc}"
            raise ConfigError(msg) from None
        out[p.site_name] = {
            "target_epsilon": spec.epsilon,
            "delta": delta,
            "noise_multiplier_sgd": noise.sgd,
            "noise_multiplier_stats": noise.stats,
        }
        if PRIMARY in schedule.one_shot:
            out[p.site_name]["noise_multiplier_class_means"] = noise.stats * schedule.scale(PRIMARY)
    return out


def check_report(report: Mapping[str, Any] | None, *, dp_on: bool, target: float) -> None:
    """A DP site must report what it spent (finite epsilon within 1% of the target, delta in (0, 1)); a non-DP site must
    not."""
    if not dp_on:
        if report is not None:
            msg = "a DP report from a site in a run without DP"
            raise ProtocolError(msg)
        return
    if report is None:
        msg = "the run asks for DP but the site sent no DP report (is it running an older fedscdd?)"
        raise ProtocolError(msg)
    eps, delta = float(report["epsilon"]), float(report["delta"])
    if not (math.isfinite(eps) and 0 <= eps <= target * 1.01 and 0 < delta < 1) or not report.get("mechanisms"):
        msg = (
            f"DP report out of range: epsilon {eps:.4g} (target {target:g}), delta {delta:.3g}, "
            f"{len(report.get('mechanisms', []))} mechanisms"
        )
        raise ProtocolError(msg)
