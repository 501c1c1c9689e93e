"""Pure aggregation on the server: FedAvg of state dicts, latent moments, metric aggregation (the plan:
``shared.plan``).

No Flower, no I/O: inputs are numpy arrays and plain values (profiles and replies are read through
their attributes only), so every function is unit-tested on its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shared.audit import AUDIT_KEYS
from shared.protocol.rounds import FIDELITY_KEYS


def fedavg(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Weighted average of state dicts (float64 accumulation, original dtypes kept; non-float entries from the
    first)."""
    if not states or len(states) != len(weights):
        msg = f"need one weight per state dict, got {len(states)} states and {len(weights)} weights"
        raise ValueError(msg)
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        msg = "FedAvg weights must be non-negative with a positive sum"
        raise ValueError(msg)
    w = w / w.sum()
    out: dict[str, np.ndarray] = {}
    for key, first in states[0].items():
        if np.asarray(first).dtype.kind != "f":
            out[key] = np.array(first, copy=True)
            continue
        acc = np.zeros(np.shape(first), dtype=np.float64)
        for wi, state in zip(w, states, strict=True):
            acc += wi * np.asarray(state[key], dtype=np.float64)
        out[key] = acc.astype(np.asarray(first).dtype)
    return out


def latent_moments(
    sums: Sequence[np.ndarray], sumsqs: Sequence[np.ndarray], counts: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled per-dimension mean and (population) standard deviation from per-site sums."""
    n = float(sum(counts))
    if n <= 0:
        msg = "no cells behind the latent statistics"
        raise ValueError(msg)
    mean = np.sum(np.asarray(sums, np.float64), axis=0) / n
    var = np.sum(np.asarray(sumsqs, np.float64), axis=0) / n - mean**2
    return mean, np.sqrt(np.maximum(var, 0.0))


def _nanmean(values: Sequence[float], weights: Sequence[float] | None = None) -> float:
    v = np.asarray(values, np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, np.float64)
    ok = np.isfinite(v) & (w > 0)
    return float(np.sum(v[ok] * w[ok]) / np.sum(w[ok])) if ok.any() else float("nan")


def _aggregate_block(per_site: Mapping[str, Mapping[str, Any]], block: str, n: Sequence[float]) -> dict[str, Any]:
    """A per-site ``{evaluator: {metric: value}}`` block (``local_only``, ``fine_tuned``), aggregated like scores."""
    sites = sorted(per_site)
    out: dict[str, Any] = {"cell_weighted": {}, "macro": {}}
    for ev in sorted({ev for s in sites for ev in per_site[s].get(block, {})}):
        for metric in ("accuracy", "macro_f1"):
            vals = [per_site[s].get(block, {}).get(ev, {}).get(metric, float("nan")) for s in sites]
            out["cell_weighted"].setdefault(ev, {})[metric] = _nanmean(vals, n)
            out["macro"].setdefault(ev, {})[metric] = _nanmean(vals)
    return out


def aggregate_scores(per_site: Mapping[str, Mapping[str, Any]], evaluators: Sequence[str]) -> dict[str, Any]:
    """Aggregate per-site results (``site_result`` dicts) into cell-weighted and macro (mean over sites) numbers.

    Test scores are weighted by each site's test cells, validation scores by its validation cells;
    the audit is averaged over sites (macro) and its worst site kept (``seed_mia_max``).
    """
    sites = sorted(per_site)
    n = [float(per_site[s]["n_test"]) for s in sites]
    n_val = [float(per_site[s]["validation"]["n_val"]) for s in sites]
    out: dict[str, Any] = {
        "cell_weighted": {},
        "macro": {},
        "validation": {"cell_weighted": {}, "macro": {}},
        "n_sites": len(sites),
        "n_test": int(sum(n)),
        "n_val": int(sum(n_val)),
    }
    for ev in evaluators:
        for metric in ("accuracy", "macro_f1"):
            vals = [per_site[s]["scores"][ev][metric] for s in sites]
            out["cell_weighted"].setdefault(ev, {})[metric] = _nanmean(vals, n)
            out["macro"].setdefault(ev, {})[metric] = _nanmean(vals)
            vvals = [per_site[s]["validation"]["scores"][ev][metric] for s in sites]
            out["validation"]["cell_weighted"].setdefault(ev, {})[metric] = _nanmean(vvals, n_val)
            out["validation"]["macro"].setdefault(ev, {})[metric] = _nanmean(vvals)
    # fidelity of the synthetic cells against each site's own test cells: the mean over sites (and weighted by test
    # cells)
    out["fidelity"] = {key: _nanmean([per_site[s]["fidelity"][key] for s in sites]) for key in FIDELITY_KEYS}
    out["fidelity_cell_weighted"] = {
        key: _nanmean([per_site[s]["fidelity"][key] for s in sites], n) for key in FIDELITY_KEYS
    }
    out["validation"]["fidelity"] = {
        key: _nanmean([per_site[s]["validation"].get("fidelity", {}).get(key, math.nan) for s in sites])
        for key in FIDELITY_KEYS
    }
    out["audit"] = {key: _nanmean([per_site[s]["audit"][key] for s in sites]) for key in AUDIT_KEYS}
    for block in ("local_only", "fine_tuned"):  # a site's own model and the shared one trained further at the site
        out[block] = _aggregate_block(per_site, block, n)
    worst = [per_site[s]["audit"]["seed_mia"] for s in sites if math.isfinite(per_site[s]["audit"]["seed_mia"])]
    out["audit"]["seed_mia_max"] = max(worst) if worst else float("nan")
    return out


def _scores_dict(scores: Mapping[str, Any]) -> dict[str, Any]:
    return {
        ev: {"accuracy": s.accuracy, "macro_f1": s.macro_f1, "per_class_recall": list(s.recall)}
        for ev, s in scores.items()
    }


def site_result(reply: Any) -> dict[str, Any]:
    """An ``EvaluateReply`` as a JSON-ready dict (NaN kept; json writes it as NaN)."""
    return {
        "n_test": int(reply.n_test),
        "scores": _scores_dict(reply.scores),
        "validation": {
            "n_val": int(reply.n_val),
            "scores": _scores_dict(reply.val_scores),
            "fidelity": dict(reply.val_fidelity),
        },
        "fidelity": dict(reply.fidelity),
        "audit": dict(reply.audit),
        "local_only": {ev: dict(v) for ev, v in reply.local_only.items()},
        "fine_tuned": {ev: dict(v) for ev, v in reply.fine_tuned.items()},
    }
