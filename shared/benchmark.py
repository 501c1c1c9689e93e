"""In-process benchmark (DESIGN §7): sites from one file, every method at several k, real held-out scoring.

Every seed re-draws what a seed should: the Dirichlet site split (files without a site column),
each site's train / validation / test split, pretraining and distillation. Scores are on the
pooled TEST cells by default; tuning scripts pass ``score_on="val"`` and never see test cells.
The latent space and SCDG are pretrained on the sites' POOLED training cells here (a stand-in for
federated pretraining); results say so.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from shared.audit import AUDIT_KEYS, Audit, audit, random_members
from shared.baselines import SyntheticSet, coreset, distribution_matching, gaussian
from shared.distill import DECODE_MODE as SCDD_DECODE_MODE
from shared.distill import DistillConfig, code_counts, distill_codes, generate
from shared.evaluation import EVALUATORS, Evaluator, MLPTrainConfig, fit_predict, score
from shared.pretrain import PretrainConfig, Pretrained, pretrain
from shared.sites import Federation, prepare_federation, site_of_cells

logger = logging.getLogger(__name__)

METHODS = ("scdd", "scdd_noopt", "dm", "random", "herding", "kcenter", "gaussian", "local", "centralized")
K_FREE = ("local", "centralized")
DECODE_MODE = "expected expression at every k"  # how scdd codes become cells (shared.distill.DECODE_MODE)
ScoreOn = Literal["test", "val"]


@dataclass(frozen=True)
class SplitConfig:
    """How one file becomes sites and each site's cells train / validation / test parts."""

    label_key: str = "cell_type"
    site_key: str = "batch"  # absent from obs: a Dirichlet(0.5) label-skew split into n_sites
    n_sites: int = 3
    n_genes: int = 2000
    test_fraction: float = 0.2
    val_fraction: float = 0.1


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to run; defaults follow DESIGN §7."""

    methods: tuple[str, ...] = METHODS
    ks: tuple[int, ...] = (1, 10, 50)
    seeds: int = 3
    evaluators: tuple[Evaluator, ...] = EVALUATORS
    distill: DistillConfig = field(default_factory=DistillConfig)
    dm_iterations: int = 500
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    mlp: MLPTrainConfig = field(default_factory=MLPTrainConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    score_on: ScoreOn = "test"

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            msg = f"unknown methods {bad}; choose from {', '.join(METHODS)}"
            raise ValueError(msg)
        if self.score_on not in ("test", "val") or self.seeds < 1:
            msg = f"score_on must be 'test' or 'val' and seeds >= 1; got {self.score_on!r}, {self.seeds}"
            raise ValueError(msg)


@dataclass
class Cell:
    """Accumulated results of one (method, k, evaluator): one entry per seed."""

    accuracy: list[float] = field(default_factory=list)
    macro_f1: list[float] = field(default_factory=list)
    upload_bytes: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    audits: list[list[Audit]] = field(default_factory=list)  # per seed, one per site
    zero_fraction: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class SeedRun:
    """What one seed prepared: the sites, their split hash and the pooled pretraining."""

    seed: int
    fed: Federation
    split_hash: str
    pre: Pretrained | None  # None when only the split was prepared

    def summary(self) -> dict[str, object]:
        """What results.json records of this seed."""
        secs = {"vae": self.pre.vae_seconds, "scdg": self.pre.scdg_seconds} if self.pre else {}
        return {"seed": self.seed, "split_hash": self.split_hash, "sites": list(self.fed.names), "n_genes": len(self.fed.genes),
                "n_classes": len(self.fed.classes), "pretrain_seconds": secs}


@dataclass(frozen=True)
class SiteSet:
    """One site's contribution: its synthetic cells and which of its training cells seeded them."""

    syn: SyntheticSet
    members: np.ndarray  # row indices into the site's training cells


def prepare_seed(adata: ad.AnnData, cfg: BenchmarkConfig, seed: int, *, pretrain_models: bool = True) -> SeedRun:
    """Sites, splits and (pooled) pretraining of one seed."""
    sp_cfg = cfg.split
    col = site_of_cells(adata, label_key=sp_cfg.label_key, site_key=sp_cfg.site_key, n_sites=sp_cfg.n_sites, seed=seed)
    parts = {str(s): adata[col == s].copy() for s in sorted(set(col))}
    fed = prepare_federation(parts, label_key=sp_cfg.label_key, n_genes=sp_cfg.n_genes, seed=seed,
                             test_fraction=sp_cfg.test_fraction, val_fraction=sp_cfg.val_fraction)
    digest = hashlib.sha256(np.unique(col, return_inverse=True)[1].astype(np.int64).tobytes() + fed.split_hash().encode()).hexdigest()[:16]
    if not pretrain_models:
        return SeedRun(seed, fed, digest, None)
    X_all, y_all = fed.pooled("train")
    pre = pretrain(X_all, y_all, len(fed.classes), cfg.pretrain.with_seed(seed))
    return SeedRun(seed, fed, digest, pre)


def _site_set(method: str, X: sp.csr_matrix, y: np.ndarray, pre: Pretrained | None, k: int, seed: int, cfg: BenchmarkConfig) -> SiteSet:
    """One site's synthetic set for `method`, with its seed members."""
    if method in ("scdd", "scdd_noopt"):
        assert pre is not None, "scdd needs pretrained models"
        dcfg = replace(cfg.distill, k=k, seed=seed, iterations=0 if method == "scdd_noopt" else cfg.distill.iterations)
        codes = distill_codes(pre.vae, pre.scdg, X, y, dcfg)
        cells = generate(pre.vae, pre.scdg, codes, mode=SCDD_DECODE_MODE, seed=seed)
        assert codes.seed_rows is not None
        return SiteSet(SyntheticSet(cells, codes.labels, codes.nbytes), codes.seed_rows)
    if method == "dm":
        syn = distribution_matching(X, y, k, iterations=cfg.dm_iterations, seed=seed)
        return SiteSet(syn, syn.members)
    if method == "gaussian":
        classes, counts = code_counts(y, k)
        return SiteSet(gaussian(X, y, k, seed=seed), random_members(y, dict(zip(classes.tolist(), counts.tolist(), strict=True)), seed))
    syn = coreset(X, y, k, method=method, seed=seed)
    return SiteSet(syn, syn.members)


def _synthetic(method: str, run: SeedRun, k: int, cfg: BenchmarkConfig) -> tuple[SyntheticSet, float, list[Audit]]:
    """Every site's set for `method`, fused; mean seconds per site; the audit at every site."""
    fed = run.fed
    parts, secs, audits = [], [], []
    for i in range(len(fed.sites)):
        X, y = fed.train(i)
        t0 = time.perf_counter()
        part = _site_set(method, X, y, run.pre, k, run.seed * 7919 + 1000 * i, cfg)
        secs.append(time.perf_counter() - t0)
        parts.append(part)
        audits.append(audit(X, y, part.members, *fed.test(i), fed.val(i)[0], part.syn.X, aligned=True, seed=run.seed))
    fused = SyntheticSet(np.concatenate([p.syn.X for p in parts]), np.concatenate([p.syn.labels for p in parts]),
                         int(np.mean([p.syn.upload_bytes for p in parts])))
    return fused, float(np.mean(secs)), audits


def _score_set(X: sp.csr_matrix | np.ndarray, y: np.ndarray, fed: Federation, evaluator: Evaluator, seed: int, cfg: BenchmarkConfig) -> tuple[float, float]:
    X_eval, y_eval = fed.pooled(cfg.score_on)
    torch.manual_seed(seed)
    pred = fit_predict(evaluator, X, y, X_eval, len(fed.classes), seed=seed, mlp=cfg.mlp)
    s = score(y_eval, pred)
    return s.accuracy, s.macro_f1


def run(adata: ad.AnnData, cfg: BenchmarkConfig, *, progress: Callable[[str], None] | None = None) -> tuple[dict[tuple[str, int | None, str], Cell], list[dict[str, object]]]:
    """Run every (seed, method, k, evaluator) of `cfg` on one file; also returns each seed's summary (split hash, sites, pretraining)."""
    cells: dict[tuple[str, int | None, str], Cell] = {}
    tick = progress or (lambda _msg: None)
    runs = []
    for seed in range(cfg.seeds):
        sr = prepare_seed(adata, cfg, seed)
        runs.append(sr.summary())
        logger.info("seed %d: split %s, %s", seed, sr.split_hash, ", ".join(sr.fed.names))
        for method in cfg.methods:
            for k in [None] if method in K_FREE else list(cfg.ks):
                sets, secs, nbytes, audits, zero = _training_sets(method, k, sr, cfg)
                for ev in cfg.evaluators:
                    cell = cells.setdefault((method, k, ev), Cell())
                    accs, f1s = zip(*(_score_set(X, y, sr.fed, ev, seed, cfg) for X, y in sets), strict=True)
                    cell.accuracy.append(float(np.mean(accs)))
                    cell.macro_f1.append(float(np.mean(f1s)))
                    cell.seconds.append(secs)
                    cell.upload_bytes.append(nbytes)
                    if audits is not None:
                        cell.audits.append(audits)
                        cell.zero_fraction.append(zero)
                tick(f"seed={seed} {method} k={k}")
    return cells, runs


def _training_sets(method: str, k: int | None, run: SeedRun, cfg: BenchmarkConfig) -> tuple[list[tuple[sp.csr_matrix | np.ndarray, np.ndarray]], float, float, list[Audit] | None, float]:
    """Training set(s) a method yields (one fused set, or one per site for local-only), seconds, bytes, audits, zero fraction."""
    fed = run.fed
    if method == "centralized":
        return [fed.pooled("train")], 0.0, float("nan"), None, float("nan")
    if method == "local":
        return [fed.train(i) for i in range(len(fed.sites))], 0.0, 0.0, None, float("nan")
    assert k is not None
    syn, secs, audits = _synthetic(method, run, k, cfg)
    return [(syn.X, syn.labels)], secs, float(syn.upload_bytes), audits, float((syn.X == 0).mean())


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def rows(cells: dict[tuple[str, int | None, str], Cell]) -> list[dict[str, object]]:
    """results.json rows: one per (method, k, evaluator), with per-seed accuracies and the audit."""
    out = []
    for (method, k, ev), c in cells.items():
        row: dict[str, object] = {
            "method": method,
            "k": k,
            "evaluator": ev,
            "accuracy_mean": float(np.mean(c.accuracy)),
            "accuracy_std": float(np.std(c.accuracy)),
            "accuracy_per_seed": [float(a) for a in c.accuracy],
            "macro_f1_mean": float(np.mean(c.macro_f1)),
            "upload_bytes_per_site": float(np.mean(c.upload_bytes)),
            "distill_seconds": float(np.mean(c.seconds)),
            "n_seeds": len(c.accuracy),
        }
        if c.audits:
            for key in AUDIT_KEYS:  # mean over sites, then over seeds
                row[key] = _nanmean([_nanmean([getattr(a, key) for a in per_site]) for per_site in c.audits])
            row["seed_mia_max"] = _nanmean([max((a.seed_mia for a in per_site if np.isfinite(a.seed_mia)), default=float("nan")) for per_site in c.audits])
            row["zero_fraction"] = _nanmean(c.zero_fraction)
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
    lines += ["## upload bytes and distillation seconds per site; privacy audit (0.5 = no signal; mean over sites and seeds, worst site); zero fraction",
              "", "| method | k | bytes | seconds | seed MIA | seed MIA worst site | population MIA | density MIA | DCR share | zero frac |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for r in table_rows:
        if r["evaluator"] == evaluators[0] and r["method"] not in K_FREE:
            audit_cols = " | ".join(f"{r.get(key, nan):.3f}" for key in ("seed_mia", "seed_mia_max", "population_mia", "density_mia", "dcr_share"))
            lines.append(f"| {r['method']} | {r['k']} | {r['upload_bytes_per_site']:.0f} | {r['distill_seconds']:.2f} | {audit_cols} | {r.get('zero_fraction', nan):.3f} |")
    return "\n".join(lines) + "\n"
