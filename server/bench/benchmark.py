"""The benchmark: sites from one file, every method at several k, scored on real held-out cells.

``scdd`` is the code that ships: the ServerApp and ClientApp run over the in-process grid
(``server.cli.simulation``) with the run's config: plan, FedAvg pretraining, distillation rounds,
fusion. The benchmark reads the run's fused synthetic set and the sites' audits. ``scdd_noopt``
distils with no optimisation from the same FedAvg-pretrained models; ``scdd_pooled`` (an upper
bound) runs the same federation from models pretrained on the sites' POOLED training cells
(``pretrained-path``). ``fedavg_mlp`` is FedAvg of the evaluation MLP itself on real cells, with
as many rounds as the federation's pretraining. The other baselines run in this process on the
same sites, splits and plan genes (``shared.plan``, the federation's rule).

Every seed re-draws what a seed should: the Dirichlet site split (files without a site column),
each site's train / validation / test split, pretraining and distillation. Scores are on the
pooled TEST cells by default; tuning scripts pass ``score_on="val"`` and never see test cells.
``leave_out``: one site takes no part in anything; the numbers are scored on its cells only.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from server.bench.baselines import SyntheticSet, coreset, distribution_matching, gaussian
from server.bench.federated import fedavg_mlp, federate, pretrain_rounds, run_config, save_pooled
from server.cli.simulation import app_config_defaults
from server.config import FederationConfig
from shared.audit import AUDIT_KEYS, Audit, audit, random_members
from shared.distill import DECODE_MODE as SCDD_DECODE_MODE
from shared.distill import DistillConfig, code_counts, distill_codes, generate
from shared.errors import ConfigError
from shared.evaluation import EVALUATORS, Evaluator, MLPTrainConfig, fidelity, fit_predict, predict_mlp, score
from shared.io import write_h5ad
from shared.pretrain import PretrainConfig, Pretrained, pretrain
from shared.protocol import SiteSpec
from shared.sites import Federation, prepare_federation, site_of_cells

logger = logging.getLogger(__name__)

METHODS = (
    "scdd",
    "scdd_pooled",
    "scdd_noopt",
    "fedavg_mlp",
    "dm",
    "random",
    "herding",
    "kcenter",
    "gaussian",
    "local",
    "centralized",
)
K_FREE = ("fedavg_mlp", "local", "centralized")
FEDERATED = ("scdd", "scdd_pooled", "scdd_noopt")  # run through the shipped ServerApp / ClientApp
PRETRAINING_MODE = {"scdd": "fedavg", "scdd_noopt": "fedavg", "scdd_pooled": "pooled"}  # every other method: "none"
MLP_ONLY = ("fedavg_mlp",)  # a trained model, not a training set: scored with its own MLP only
ScoreOn = Literal["test", "val"]
_RUN = FederationConfig()  # the run config's defaults: the benchmark splits files as a federation does


@dataclass(frozen=True)
class SplitConfig:
    """How one file becomes sites and each site's cells train / validation / test parts (the federation's defaults)."""

    label_key: str = _RUN.label_key
    site_key: str = _RUN.sim_site_key  # absent from obs: a Dirichlet(0.5) label-skew split into n_sites
    n_sites: int = _RUN.sim_num_sites
    n_genes: int = _RUN.n_genes
    test_fraction: float = _RUN.test_fraction
    val_fraction: float = _RUN.val_fraction


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to run: every method at k = 1, 10, 50 with three seeds, scored by every evaluator (README, "Benchmark").

    ``federation``: run-config overrides for the federated rows (as ``scdd simulate --set``); the
    distillation settings of ``distill`` (iterations, t*, init) reach them as run-config keys too.
    """

    methods: tuple[str, ...] = METHODS
    ks: tuple[int, ...] = (1, 10, 50)
    seeds: int = 3
    evaluators: tuple[Evaluator, ...] = EVALUATORS
    distill: DistillConfig = field(default_factory=DistillConfig)
    dm_iterations: int = 500
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # the pooled upper bound (scdd_pooled)
    mlp: MLPTrainConfig = field(default_factory=MLPTrainConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    score_on: ScoreOn = "test"
    federation: tuple[tuple[str, Any], ...] = ()
    leave_out: str | None = None  # a site that takes no part: every number is scored on its cells only
    work_dir: str | None = None  # where the federated runs are kept (None: a temporary folder, removed afterwards)

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            msg = f"unknown methods {bad}; choose from {', '.join(METHODS)}"
            raise ValueError(msg)
        if self.score_on not in ("test", "val") or self.seeds < 1:
            msg = f"score_on must be 'test' or 'val' and seeds >= 1; got {self.score_on!r}, {self.seeds}"
            raise ValueError(msg)
        FederationConfig.from_run_config(
            {**app_config_defaults(), **self.overrides()}
        )  # refuses unknown keys and bad values now, not mid-run

    def overrides(self) -> dict[str, Any]:
        """Run-config keys of the federated rows: the distillation settings, then ``federation``."""
        out: dict[str, Any] = {}
        if self.distill.iterations is not None:
            out["distill-iterations"] = self.distill.iterations
        if self.distill.t_star is not None:
            out["distill-t-star"] = self.distill.t_star
        if self.distill.init != DistillConfig().init:
            out["distill-init"] = self.distill.init
        return out | dict(self.federation)


@dataclass
class ResultCell:
    """Accumulated results of one (method, k, evaluator): one entry per seed."""

    accuracy: list[float] = field(default_factory=list)
    macro_f1: list[float] = field(default_factory=list)
    upload_bytes: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    audits: list[list[Audit]] = field(default_factory=list)  # per seed, one per site
    zero_fraction: list[float] = field(default_factory=list)
    pretrain_upload_bytes: list[float] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    fidelity: list[dict[str, float]] = field(
        default_factory=list
    )  # per seed: the training cells against the scored cells


@dataclass(frozen=True)
class SeedRun:
    """What one seed prepared: the sites (on the federation's plan), their split hash, pooled pretraining, a left-out
    site."""

    seed: int
    fed: Federation
    split_hash: str
    pre: Pretrained | None  # pooled pretraining; None unless asked for
    heldout: Federation | None = None  # the left-out site, on the plan's genes and classes

    def summary(self) -> dict[str, object]:
        """What results.json records of this seed."""
        secs = {"vae": self.pre.vae_seconds, "scdg": self.pre.scdg_seconds} if self.pre else {}
        out: dict[str, object] = {
            "seed": self.seed,
            "split_hash": self.split_hash,
            "sites": list(self.fed.names),
            "n_genes": len(self.fed.genes),
            "n_classes": len(self.fed.classes),
            "pooled_pretrain_seconds": secs,
        }
        if self.heldout is not None:
            out["left_out"] = self.heldout.names[0]
        return out


@dataclass(frozen=True)
class SiteSet:
    """One site's contribution: its synthetic cells and which of its training cells seeded them."""

    syn: SyntheticSet
    members: np.ndarray  # row indices into the site's training cells


def _parts(adata: ad.AnnData, cfg: BenchmarkConfig, seed: int) -> tuple[np.ndarray, dict[str, ad.AnnData]]:
    sp_cfg = cfg.split
    col = site_of_cells(adata, label_key=sp_cfg.label_key, site_key=sp_cfg.site_key, n_sites=sp_cfg.n_sites, seed=seed)
    return col, {str(s): adata[col == s].copy() for s in sorted(set(col))}


def prepare_seed(adata: ad.AnnData, cfg: BenchmarkConfig, seed: int, *, pretrain_models: bool = False) -> SeedRun:
    """Sites, splits and the plan of one seed (the federation's rule, on training cells); pooled pretraining when
    asked."""
    sp_cfg = cfg.split
    col, parts = _parts(adata, cfg, seed)
    held = None
    if cfg.leave_out:
        if cfg.leave_out not in parts:
            msg = f"--leave-out {cfg.leave_out!r} is not a site of this file; its sites: {', '.join(parts)}"
            raise ConfigError(msg)
        held = {cfg.leave_out: parts.pop(cfg.leave_out)}
    kw = {
        "label_key": sp_cfg.label_key,
        "seed": seed,
        "test_fraction": sp_cfg.test_fraction,
        "val_fraction": sp_cfg.val_fraction,
    }
    fed = prepare_federation(parts, n_genes=sp_cfg.n_genes, **kw)  # type: ignore[arg-type]
    heldout = prepare_federation(held, genes=fed.genes, **kw) if held else None  # type: ignore[arg-type]
    digest = hashlib.sha256(
        np.unique(col, return_inverse=True)[1].astype(np.int64).tobytes() + fed.split_hash().encode()
    ).hexdigest()[:16]
    if not pretrain_models:
        return SeedRun(seed, fed, digest, None, heldout)
    X_all, y_all = fed.pooled("train")
    return SeedRun(seed, fed, digest, pretrain(X_all, y_all, len(fed.classes), cfg.pretrain.with_seed(seed)), heldout)


def _site_set(
    method: str, X: sp.csr_matrix, y: np.ndarray, pre: Pretrained | None, k: int, seed: int, cfg: BenchmarkConfig
) -> SiteSet:
    """One site's synthetic set for an in-process `method` (and scdd distilled from given models, for tuning
    scripts)."""
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
        return SiteSet(
            gaussian(X, y, k, seed=seed),
            random_members(y, dict(zip(classes.tolist(), counts.tolist(), strict=True)), seed),
        )
    syn = coreset(X, y, k, method=method, seed=seed)
    return SiteSet(syn, syn.members)


def _synthetic(method: str, run: SeedRun, k: int, cfg: BenchmarkConfig) -> tuple[SyntheticSet, float, list[Audit]]:
    """Every site's set for an in-process `method`, fused; mean seconds per site; the audit at every site."""
    fed = run.fed
    parts, secs, audits = [], [], []
    for i in range(len(fed.sites)):
        X, y = fed.train(i)
        t0 = time.perf_counter()
        part = _site_set(method, X, y, run.pre, k, run.seed * 7919 + 1000 * i, cfg)
        secs.append(time.perf_counter() - t0)
        parts.append(part)
        audits.append(audit(X, y, part.members, *fed.test(i), fed.val(i)[0], part.syn.X, aligned=True, seed=run.seed))
    fused = SyntheticSet(
        np.concatenate([p.syn.X for p in parts]),
        np.concatenate([p.syn.labels for p in parts]),
        int(np.mean([p.syn.upload_bytes for p in parts])),
    )
    return fused, float(np.mean(secs)), audits


def eval_cells(run: SeedRun, cfg: BenchmarkConfig) -> tuple[sp.csr_matrix, np.ndarray]:
    """The cells every method is scored on: the pooled test (or validation) cells, or the left-out site's.

    The left-out site's cells of a class no participating site has are not scored (no method can
    name a class it never saw); the log says how many.
    """
    if run.heldout is None:
        return run.fed.pooled(cfg.score_on)
    X, y = run.heldout.pooled(cfg.score_on)
    lookup = {c: i for i, c in enumerate(run.fed.classes)}
    ids = np.array([lookup.get(c, -1) for c in run.heldout.classes], dtype=np.int64)[y]
    if (ids < 0).any():
        logger.info(
            "left-out site: %d of %d cells are of classes no participating site has; not scored",
            int((ids < 0).sum()),
            len(ids),
        )
    return X[ids >= 0], ids[ids >= 0]


def _score_set(
    X: sp.csr_matrix | np.ndarray, y: np.ndarray, run: SeedRun, evaluator: Evaluator, seed: int, cfg: BenchmarkConfig
) -> tuple[float, float]:
    X_eval, y_eval = eval_cells(run, cfg)
    torch.manual_seed(seed)
    pred = fit_predict(evaluator, X, y, X_eval, len(run.fed.classes), seed=seed, mlp=cfg.mlp)
    s = score(y_eval, pred)
    return s.accuracy, s.macro_f1


@dataclass(frozen=True)
class Produced:
    """What one (method, k) yields for one seed: training sets (or a trained MLP), cost, audit."""

    sets: list[tuple[sp.csr_matrix | np.ndarray, np.ndarray]]
    seconds: float = 0.0
    upload_bytes: float = float("nan")
    audits: list[Audit] | None = None
    zero_fraction: float = float("nan")
    pretrain_upload_bytes: float = float("nan")
    rounds: int = 0
    model: Any = None  # fedavg_mlp: the trained MLP


SITE_COLUMN = "benchmark_site"  # the site of every cell, written into a leave-one-out copy of the input


class Workspace:
    """Per-seed federated runs on disk: the FedAvg-pretrained and pooled ``pretrained-path`` folders are reused across
    k."""

    def __init__(self, path: Path, adata_path: Path, cfg: BenchmarkConfig) -> None:
        self.root, self.data, self.cfg = path, adata_path, cfg
        self.pretrained: dict[tuple[int, str], Path] = {}
        self.cost: dict[
            int, tuple[float, int]
        ] = {}  # seed -> (weights uploaded per site, FedAvg rounds) of its FedAvg pretraining

    def data_for(self, run: SeedRun, adata: ad.AnnData) -> tuple[Path, str]:
        """The file the simulated sites read and its site column: the input, or (leave-one-out) a copy without the
        left-out site."""
        if run.heldout is None:
            return self.data, self.cfg.split.site_key
        col, _ = _parts(adata, self.cfg, run.seed)
        keep = adata[col != run.heldout.names[0]].copy()
        keep.obs[SITE_COLUMN] = col[col != run.heldout.names[0]]
        path = self.root / f"seed{run.seed}" / f"without-{run.heldout.names[0]}.h5ad"
        if not path.is_file():
            write_h5ad(path, keep)
        return path, SITE_COLUMN


def _federated(method: str, k: int, run: SeedRun, cfg: BenchmarkConfig, ws: Workspace, adata: ad.AnnData) -> Produced:
    """A scdd row from the shipped federation: FedAvg pretraining once per seed, then ``pretrained-path`` for the other
    k and rows."""
    data, site_key = ws.data_for(run, adata)
    sp_cfg = cfg.split
    over = cfg.overrides()
    if method == "scdd_noopt":
        over["distill-iterations"] = 0
    mode = PRETRAINING_MODE[method]
    if mode == "pooled" and (run.seed, mode) not in ws.pretrained:
        assert run.pre is not None, "scdd_pooled needs the pooled pretraining of this seed"
        spec = SiteSpec(
            label_key=sp_cfg.label_key,
            test_fraction=sp_cfg.test_fraction,
            val_fraction=sp_cfg.val_fraction,
            split_seed=run.seed,
        )
        ws.pretrained[(run.seed, mode)] = save_pooled(
            run.pre, run.fed, spec, ws.root / f"seed{run.seed}" / "pooled-pretrained"
        )
    base = ws.pretrained.get((run.seed, mode))
    if base is not None:
        over["pretrained-path"] = str(base)
    out = ws.root / f"seed{run.seed}" / f"{method}-k{k}"
    rc = run_config(
        data,
        seed=run.seed,
        k=k,
        out=out,
        label_key=sp_cfg.label_key,
        site_key=site_key,
        n_sites=sp_cfg.n_sites,
        n_genes=sp_cfg.n_genes,
        test_fraction=sp_cfg.test_fraction,
        val_fraction=sp_cfg.val_fraction,
        overrides=over,
    )
    t0 = time.perf_counter()
    res = federate(rc, classes=run.fed.classes, cache=ws.root / "site-cache")
    logger.info("seed %d %s k=%d: federation in %.0f s (%s)", run.seed, method, k, time.perf_counter() - t0, out)
    if res.genes != run.fed.genes:
        msg = (
            f"the federation planned other genes than the benchmark for the same training cells ({out}); "
            "the two must share shared.plan"
        )
        raise RuntimeError(msg)
    if base is None:  # this run pretrained: later k and rows of this seed reuse its models, and carry its cost
        ws.pretrained[(run.seed, mode)] = out / "pretrained"
        ws.cost[run.seed] = (res.pretrain_upload_bytes, res.pretrain_rounds)
    weights, rounds = ws.cost.get(run.seed, (0.0, 0)) if mode == "fedavg" else (0.0, 0)
    return Produced(
        [(res.X, res.labels)],
        res.distill_seconds,
        res.upload_bytes,
        res.audits,
        float((res.X == 0).mean()),
        weights,
        rounds,
    )


def _produce(
    method: str, k: int | None, run: SeedRun, cfg: BenchmarkConfig, ws: Workspace, adata: ad.AnnData
) -> Produced:
    """Training set(s) a method yields (one fused set, or one per site for local-only), or its trained model."""
    fed = run.fed
    if method == "centralized":
        return Produced([fed.pooled("train")])
    if method == "local":
        return Produced([fed.train(i) for i in range(len(fed.sites))], upload_bytes=0.0)
    if method == "fedavg_mlp":
        rounds = pretrain_rounds(cfg.overrides())
        t0 = time.perf_counter()
        model, nbytes = fedavg_mlp(fed, rounds=rounds, mlp=cfg.mlp, seed=run.seed)
        return Produced([], time.perf_counter() - t0, nbytes, pretrain_upload_bytes=nbytes, rounds=rounds, model=model)
    assert k is not None
    if method in FEDERATED:
        return _federated(method, k, run, cfg, ws, adata)
    syn, secs, audits = _synthetic(method, run, k, cfg)
    return Produced([(syn.X, syn.labels)], secs, float(syn.upload_bytes), audits, float((syn.X == 0).mean()))


def run(
    path: str | Path, cfg: BenchmarkConfig, *, progress: Callable[[str], None] | None = None
) -> tuple[dict[tuple[str, int | None, str], ResultCell], list[dict[str, object]]]:
    """Run every (seed, method, k, evaluator) of `cfg` on one file; also returns each seed's summary (split hash, sites,
    pretraining)."""
    from shared.data import read_h5ad

    path = Path(path)
    adata = read_h5ad(path)
    cells: dict[tuple[str, int | None, str], ResultCell] = {}
    tick = progress or (lambda _msg: None)
    runs = []
    root = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="scdd-benchmark-"))
    ws = Workspace(root, path, cfg)
    try:
        for seed in range(cfg.seeds):
            sr = prepare_seed(adata, cfg, seed, pretrain_models="scdd_pooled" in cfg.methods)
            runs.append(sr.summary())
            logger.info("seed %d: split %s, %s", seed, sr.split_hash, ", ".join(sr.fed.names))
            for method in cfg.methods:
                for k in [None] if method in K_FREE else list(cfg.ks):
                    got = _produce(method, k, sr, cfg, ws, adata)
                    _record(cells, method, k, got, sr, cfg)
                    tick(f"seed={seed} {method} k={k}")
    finally:
        if not cfg.work_dir:
            shutil.rmtree(root, ignore_errors=True)
    return cells, runs


def _record(
    cells: dict[tuple[str, int | None, str], ResultCell],
    method: str,
    k: int | None,
    got: Produced,
    run: SeedRun,
    cfg: BenchmarkConfig,
) -> None:
    """Score what a method produced with every evaluator and append one entry per metric."""
    for ev in cfg.evaluators:
        if got.model is not None:
            if ev != "mlp":
                continue
            X_eval, y_eval = eval_cells(run, cfg)
            s = score(y_eval, predict_mlp(got.model, X_eval))
            accs, f1s = [s.accuracy], [s.macro_f1]
        else:
            accs, f1s = zip(*(_score_set(X, y, run, ev, run.seed, cfg) for X, y in got.sets), strict=True)  # type: ignore[assignment]
        cell = cells.setdefault((method, k, ev), ResultCell())
        if got.model is None and ev == cfg.evaluators[0]:
            cell.fidelity.append(_fidelity(got, run, cfg))
        cell.accuracy.append(float(np.mean(accs)))
        cell.macro_f1.append(float(np.mean(f1s)))
        cell.seconds.append(got.seconds)
        cell.upload_bytes.append(got.upload_bytes)
        cell.pretrain_upload_bytes.append(got.pretrain_upload_bytes)
        cell.rounds.append(got.rounds)
        if got.audits is not None:
            cell.audits.append(got.audits)
            cell.zero_fraction.append(got.zero_fraction)


def _fidelity(got: Produced, run: SeedRun, cfg: BenchmarkConfig) -> dict[str, float]:
    """Fidelity of a method's training cells (every site's set together) against the cells every method is scored on."""
    X_real, y_real = eval_cells(run, cfg)
    X = np.vstack([cast(Any, m).toarray() if sp.issparse(m) else np.asarray(m) for m, _ in got.sets]).astype(np.float32)
    y = np.concatenate([np.asarray(labels) for _, labels in got.sets])
    return fidelity(X_real, y_real, X, y, seed=run.seed).as_dict()


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def rows(cells: dict[tuple[str, int | None, str], ResultCell]) -> list[dict[str, object]]:
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
            "pretraining_mode": PRETRAINING_MODE.get(method, "none"),
        }
        if c.fidelity:
            row["fidelity"] = {key: _nanmean([f[key] for f in c.fidelity]) for key in c.fidelity[0]}
        if method in FEDERATED or method == "fedavg_mlp":
            row["pretrain_upload_bytes_per_site"] = _nanmean(c.pretrain_upload_bytes)
            row["rounds"] = int(max(c.rounds)) if c.rounds else 0
        if c.audits:
            for key in AUDIT_KEYS:  # mean over sites, then over seeds
                row[key] = _nanmean([_nanmean([getattr(a, key) for a in per_site]) for per_site in c.audits])
            row["seed_mia_max"] = _nanmean(
                [
                    max((a.seed_mia for a in per_site if np.isfinite(a.seed_mia)), default=float("nan"))
                    for per_site in c.audits
                ]
            )
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
        lines += [
            f"## {ev} accuracy (mean ± std over seeds)",
            "",
            "| method | " + " | ".join(f"k={k}" for k in ks) + " |",
            "|---" * (len(ks) + 1) + "|",
        ]
        for m in methods:
            vals = [get.get((m, None if m in K_FREE else k, ev)) for k in ks]
            lines.append(
                f"| {m} | "
                + " | ".join(f"{v['accuracy_mean']:.3f} ± {v['accuracy_std']:.3f}" if v else "" for v in vals)
                + " |"
            )
        lines.append("")
    fid_rows = [r for r in table_rows if r["evaluator"] == evaluators[0] and "fidelity" in r]
    if fid_rows:
        lines += [
            "## fidelity: each method's training cells against the scored cells "
            "(scanpy wilcoxon top-50 markers per class; mean over seeds)",
            "",
            "| method | k | marker overlap | zero fraction synthetic / real | per-gene var corr | per-gene mean corr "
            "| MMD (50 PCs) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in fid_rows:
            f = cast(Mapping[str, float], r["fidelity"])  # mean over seeds per fidelity key
            lines.append(
                f"| {r['method']} | {r['k'] if r['k'] is not None else ''} | {f['marker_overlap']:.3f} "
                f"| {f['zero_fraction_synthetic']:.3f} / "
                f"{f['zero_fraction_real']:.3f} | {f['var_corr']:.3f} | {f['mean_corr']:.3f} | {f['mmd_pca']:.3f} |"
            )
        lines.append("")
    lines += [
        "## upload bytes and distillation seconds per site; privacy audit "
        "(0.5 = no signal; mean over sites and seeds, worst site); zero fraction",
        "",
        "| method | k | bytes | seconds | seed MIA | seed MIA worst site | population MIA | density MIA | DCR share "
        "| zero frac |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for r in table_rows:
        if r["evaluator"] == evaluators[0] and r["method"] not in K_FREE:
            audit_cols = " | ".join(
                f"{r.get(key, nan):.3f}"
                for key in ("seed_mia", "seed_mia_max", "population_mia", "density_mia", "dcr_share")
            )
            lines.append(
                f"| {r['method']} | {r['k']} | {r['upload_bytes_per_site']:.0f} | {r['distill_seconds']:.2f} "
                f"| {audit_cols} | {r.get('zero_fraction', nan):.3f} |"
            )
    fed_rows = [r for r in table_rows if r["evaluator"] == evaluators[0] and "rounds" in r]
    if fed_rows:
        lines += [
            "",
            "## federated rows: pretraining mode, FedAvg rounds, bytes uploaded per site "
            "(model weights while training; data: codes or cells)",
            "",
            "| method | k | pretraining | rounds | weights uploaded (MB) | data uploaded (KB) |",
            "|---|---|---|---|---|---|",
        ]
        for r in fed_rows:
            data = "0" if r["method"] == "fedavg_mlp" else f"{float(r['upload_bytes_per_site']) / 1e3:.1f}"  # type: ignore[arg-type]
            lines.append(
                f"| {r['method']} | {r['k'] if r['k'] is not None else ''} | {r['pretraining_mode']} | {r['rounds']} | "
                f"{float(r['pretrain_upload_bytes_per_site']) / 1e6:.1f} | {data} |"  # type: ignore[arg-type]
            )
    return "\n".join(lines) + "\n"
