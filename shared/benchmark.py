"""In-process benchmark (DESIGN §7): sites from one file, every method at several k, real held-out scoring.

The latent space and SCDG are pretrained on the sites' POOLED training cells here (a stand-in for
federated pretraining); results say so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from shared.baselines import SyntheticSet, coreset, distribution_matching, gaussian
from shared.distill import DECODE_MODE as SCDD_DECODE_MODE
from shared.distill import DistillConfig, distill_codes, generate
from shared.evaluation import EVALUATORS, Evaluator, fit_predict, membership_auc, score
from shared.pretrain import PretrainConfig, Pretrained, pretrain
from shared.sites import Federation

logger = logging.getLogger(__name__)

METHODS = ("scdd", "scdd_noopt", "dm", "random", "herding", "kcenter", "gaussian", "local", "centralized")
K_FREE = ("local", "centralized")
DECODE_MODE = "expected expression at every k"  # how scdd codes become cells (shared.distill.DECODE_MODE)


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to run; defaults follow DESIGN §7."""

    methods: tuple[str, ...] = METHODS
    ks: tuple[int, ...] = (1, 10, 50)
    seeds: int = 5
    evaluators: tuple[Evaluator, ...] = EVALUATORS
    distill: DistillConfig = field(default_factory=DistillConfig)
    dm_iterations: int = 500
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    mlp_steps: int = 400

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            msg = f"unknown methods {bad}; choose from {', '.join(METHODS)}"
            raise ValueError(msg)


@dataclass
class Cell:
    """Accumulated results of one (method, k, evaluator)."""

    accuracy: list[float] = field(default_factory=list)
    macro_f1: list[float] = field(default_factory=list)
    upload_bytes: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    mia_auc: list[float] = field(default_factory=list)
    zero_fraction: list[float] = field(default_factory=list)


def _site_synthetic(method: str, fed: Federation, pre: Pretrained, k: int, seed: int, cfg: BenchmarkConfig) -> tuple[SyntheticSet, float]:
    """One site's contribution for `method` (all sites, concatenated) and mean seconds per site."""
    parts, secs = [], []
    for i in range(len(fed.sites)):
        X, y = fed.train(i)
        t0 = time.perf_counter()
        if method in ("scdd", "scdd_noopt"):
            dcfg = DistillConfig(**{**cfg.distill.__dict__, "k": k, "seed": seed + 1000 * i, "iterations": 0 if method == "scdd_noopt" else cfg.distill.iterations})
            codes = distill_codes(pre.vae, pre.scdg, X, y, dcfg)
            part = SyntheticSet(generate(pre.vae, pre.scdg, codes, mode=SCDD_DECODE_MODE, seed=seed), codes.labels, codes.nbytes)
        elif method == "dm":
            part = distribution_matching(X, y, k, iterations=cfg.dm_iterations, seed=seed + 1000 * i)
        elif method == "gaussian":
            part = gaussian(X, y, k, seed=seed + 1000 * i)
        else:
            part = coreset(X, y, k, method=method, seed=seed + 1000 * i)
        secs.append(time.perf_counter() - t0)
        parts.append(part)
    fused = SyntheticSet(np.concatenate([p.X for p in parts]), np.concatenate([p.labels for p in parts]), int(np.mean([p.upload_bytes for p in parts])))
    return fused, float(np.mean(secs))


def _audit(fed: Federation, syn: SyntheticSet, seed: int) -> tuple[float, float]:
    """Mean membership-inference AUC over sites, and the synthetic zero fraction."""
    aucs = [membership_auc(fed.train(i)[0], fed.test(i)[0], syn.X, seed=seed) for i in range(len(fed.sites))]
    return float(np.nanmean(aucs)), float((syn.X == 0).mean())


def _score_set(X: sp.csr_matrix | np.ndarray, y: np.ndarray, fed: Federation, evaluator: Evaluator, seed: int, cfg: BenchmarkConfig) -> tuple[float, float]:
    X_test, y_test = fed.pooled("test")
    torch.manual_seed(seed)
    pred = fit_predict(evaluator, X, y, X_test, len(fed.classes), seed=seed)
    s = score(y_test, pred)
    return s.accuracy, s.macro_f1


def run(fed: Federation, cfg: BenchmarkConfig, *, progress: Callable[[str], None] | None = None) -> tuple[dict[tuple[str, int | None, str], Cell], Pretrained]:
    """Run every (method, k, seed, evaluator) of `cfg` on a prepared federation."""
    X_all, y_all = fed.pooled("train")
    pre = pretrain(X_all, y_all, len(fed.classes), cfg.pretrain)
    cells: dict[tuple[str, int | None, str], Cell] = {}
    tick = progress or (lambda _msg: None)
    for method in cfg.methods:
        for k in [None] if method in K_FREE else list(cfg.ks):
            for seed in range(cfg.seeds):
                sets, secs, nbytes, audit = _training_sets(method, k, seed, fed, pre, cfg)
                for ev in cfg.evaluators:
                    cell = cells.setdefault((method, k, ev), Cell())
                    accs, f1s = zip(*(_score_set(X, y, fed, ev, seed, cfg) for X, y in sets), strict=True)
                    cell.accuracy.append(float(np.mean(accs)))
                    cell.macro_f1.append(float(np.mean(f1s)))
                    cell.seconds.append(secs)
                    cell.upload_bytes.append(nbytes)
                    if audit is not None:
                        cell.mia_auc.append(audit[0])
                        cell.zero_fraction.append(audit[1])
                tick(f"{method} k={k} seed={seed}")
    return cells, pre


def _training_sets(method: str, k: int | None, seed: int, fed: Federation, pre: Pretrained, cfg: BenchmarkConfig) -> tuple[list[tuple[sp.csr_matrix | np.ndarray, np.ndarray]], float, float, tuple[float, float] | None]:
    """Training set(s) a method yields: one fused set, or one per site for local-only."""
    if method == "centralized":
        X, y = fed.pooled("train")
        return [(X, y)], 0.0, float("nan"), None
    if method == "local":
        return [fed.train(i) for i in range(len(fed.sites))], 0.0, 0.0, None
    assert k is not None
    syn, secs = _site_synthetic(method, fed, pre, k, seed, cfg)
    audit = _audit(fed, syn, seed) if seed == 0 else None
    return [(syn.X, syn.labels)], secs, float(syn.upload_bytes), audit


def rows(cells: dict[tuple[str, int | None, str], Cell]) -> list[dict[str, object]]:
    """results.json rows: one per (method, k, evaluator)."""
    out = []
    for (method, k, ev), c in cells.items():
        row: dict[str, object] = {
            "method": method,
            "k": k,
            "evaluator": ev,
            "accuracy_mean": float(np.mean(c.accuracy)),
            "accuracy_std": float(np.std(c.accuracy)),
            "macro_f1_mean": float(np.mean(c.macro_f1)),
            "upload_bytes_per_site": float(np.mean(c.upload_bytes)),
            "distill_seconds": float(np.mean(c.seconds)),
            "n_seeds": len(c.accuracy),
        }
        if c.mia_auc:
            row["mia_auc"] = float(np.mean(c.mia_auc))
            row["zero_fraction"] = float(np.mean(c.zero_fraction))
        out.append(row)
    return out


def markdown(dataset: str, table_rows: Sequence[dict[str, object]], ks: Sequence[int], header: str) -> str:
    """results.md: accuracy tables (one per evaluator), then bytes and seconds per site."""
    lines = [f"# {dataset}", "", header, ""]
    methods = list(dict.fromkeys(str(r["method"]) for r in table_rows))
    evaluators = list(dict.fromkeys(str(r["evaluator"]) for r in table_rows))
    get = {(r["method"], r["k"], r["evaluator"]): r for r in table_rows}
    for ev in evaluators:
        lines += [f"## {ev} accuracy (mean ± std over seeds)", "", "| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        for m in methods:
            vals = [get.get((m, None if m in K_FREE else k, ev)) for k in ks]
            lines.append(f"| {m} | " + " | ".join(f"{v['accuracy_mean']:.3f} ± {v['accuracy_std']:.3f}" if v else "" for v in vals) + " |")
        lines.append("")
    lines += ["## upload bytes per site / distillation seconds per site / MIA AUC / zero fraction (first evaluator)", "", "| method | k | bytes | seconds | MIA AUC | zero frac |", "|---|---|---|---|---|---|"]
    for r in table_rows:
        if r["evaluator"] == evaluators[0] and r["method"] not in K_FREE:
            lines.append(f"| {r['method']} | {r['k']} | {r['upload_bytes_per_site']:.0f} | {r['distill_seconds']:.2f} | {r.get('mia_auc', float('nan')):.3f} | {r.get('zero_fraction', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"
