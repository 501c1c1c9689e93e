"""Evaluate a (synthetic) training set: classifiers scored on real held-out cells, fidelity, privacy audit.

scikit-learn is imported inside the functions that use it: a site process that only pretrains or
distills (one process per message in deployment) does not pay for its import.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, cast

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from shared.device import torch_threads_kept
from shared.fitting import dense_rows
from shared.models import MLPClassifier, MLPConfig

logger = logging.getLogger(__name__)

Evaluator = Literal["mlp", "logreg", "knn"]
EVALUATORS: tuple[Evaluator, ...] = ("mlp", "logreg", "knn")
Matrix: TypeAlias = sp.csr_matrix | np.ndarray


@dataclass(frozen=True)
class Scores:
    """Classification scores on real held-out cells."""

    accuracy: float
    macro_f1: float
    per_class_recall: dict[int, float]
    n_test: int


DENSE_MAX = 250_000_000  # entries (1 GB of float32): a larger training matrix stays sparse (a hospital site's cells)
PREDICT_ROWS = 4096  # cells densified at a time when predicting
FIDELITY_MAX_CELLS = 20_000  # real cells fidelity statistics are computed on (a seeded random subset above this)


def _dense(X: Matrix) -> np.ndarray:
    return np.asarray(cast(Any, X).toarray() if sp.issparse(X) else X, dtype=np.float32)  # Any: scipy is untyped


def _fit_input(X: Matrix) -> Matrix:
    """A training matrix for scikit-learn: dense float32 up to DENSE_MAX entries (as always), sparse float32 beyond."""
    if sp.issparse(X) and X.shape[0] * X.shape[1] > DENSE_MAX:
        return sp.csr_matrix(X, dtype=np.float32)
    return _dense(X)


def _predict(clf: Any, X: Matrix) -> np.ndarray:
    """``clf.predict`` over blocks of PREDICT_ROWS densified rows (the same predictions as on the whole matrix)."""
    parts = [clf.predict(_dense(X[i : i + PREDICT_ROWS])) for i in range(0, X.shape[0], PREDICT_ROWS)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@dataclass(frozen=True)
class MLPTrainConfig:
    """How the evaluation MLP is trained: a number of epochs, with a floor and a cap on Adam steps.

    A fixed step count is unfair across training-set sizes (400 steps are 2 000 epochs of a 50-cell
    synthetic set and less than one of a 100 000-cell site). Steps = ceil(epochs * n / batch),
    clipped to [min_steps, max_steps]: small sets get min_steps, large ones epochs passes up to
    max_steps. Defaults chosen on validation cells by `benchmarks/evaluator_rule.py` (the best of 7
    rules, by a small margin: see benchmarks/results/evaluator_rule.md); the federation uses them
    unchanged (run config mlp-epochs / mlp-min-steps / mlp-max-steps).
    """

    epochs: float = 20.0
    min_steps: int = 500
    max_steps: int = 5000
    batch_size: int = 256
    lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.epochs <= 0 or not 1 <= self.min_steps <= self.max_steps or self.batch_size < 1 or self.lr <= 0:
            msg = (
                "MLPTrainConfig needs epochs > 0, 1 <= min_steps <= max_steps, batch_size >= 1, lr > 0; "
                f"got epochs={self.epochs}, min_steps={self.min_steps}, max_steps={self.max_steps}, "
                f"batch_size={self.batch_size}, lr={self.lr}"
            )
            raise ValueError(msg)

    def steps(self, n_cells: int) -> int:
        """Adam steps for a training set of n_cells cells."""
        per_epoch = math.ceil(max(n_cells, 1) / self.batch_size)
        return int(min(self.max_steps, max(self.min_steps, math.ceil(self.epochs * per_epoch))))


def train_mlp(
    X: Matrix,
    y: np.ndarray,
    n_classes: int,
    *,
    seed: int = 0,
    cfg: MLPTrainConfig | None = None,
    init: dict[str, torch.Tensor] | None = None,
    steps: int | None = None,
    device: torch.device | None = None,
) -> MLPClassifier:
    """Train the G-256-256-C MLP with AdamW for ``cfg.steps(len(X))`` minibatches (drawn with replacement).

    ``init`` (a state dict) and ``steps``: continue from given weights for a given number of steps
    (the local update of a FedAvg round). ``device``: where it trains (initialised on CPU, so the same
    weights on any device); the model comes back on CPU.
    """
    cfg = cfg or MLPTrainConfig()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = MLPClassifier(MLPConfig(n_genes=X.shape[1], n_classes=n_classes))
    if init is not None:
        model.load_state_dict(init)
    dev = device or torch.device("cpu")
    model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4, fused=True)
    yt = torch.as_tensor(y, dtype=torch.long).to(dev)
    model.train()
    for _ in range(cfg.steps(X.shape[0]) if steps is None else steps):
        idx = rng.integers(0, X.shape[0], size=min(cfg.batch_size, X.shape[0]))
        loss = F.cross_entropy(model(dense_rows(X, idx).to(dev)), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    model.to("cpu")
    return model


@torch.no_grad()
def predict_mlp(model: MLPClassifier, X: Matrix, batch_size: int = 2048) -> np.ndarray:
    """Class ids predicted by the MLP for every row of X (on the device its parameters are on)."""
    dev = next(model.parameters()).device
    out = [
        model(dense_rows(X, np.arange(i, min(i + batch_size, X.shape[0]))).to(dev)).argmax(1).cpu()
        for i in range(0, X.shape[0], batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def fit_logreg(X: Matrix, y: np.ndarray, *, seed: int, sample_weight: np.ndarray | None = None) -> Any:
    """The logistic regression of every evaluation (300 lbfgs iterations, C = 1): sites, server and benchmark.

    ``sample_weight``: scikit-learn's per-row weights. Its loss is a sum over rows against a fixed L2 penalty, so
    S rows drawn from one code fit with S times less regularisation than the code alone; weights 1 / S make them
    count as one row (benchmarks/decode_reference.py --weigh-draws measures what that does).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 300 iterations are the measured budget
        return LogisticRegression(max_iter=300, C=1.0, random_state=seed).fit(X, y, sample_weight=sample_weight)


def fit_predict(
    evaluator: Evaluator,
    X_train: Matrix,
    y_train: np.ndarray,
    X_test: Matrix,
    n_classes: int,
    *,
    seed: int = 0,
    mlp: MLPTrainConfig | None = None,
    device: torch.device | None = None,
) -> np.ndarray:
    """Train `evaluator` on (X_train, y_train) and predict X_test (``mlp``: how the MLP is trained; ``device``:
    where)."""
    from sklearn.neighbors import KNeighborsClassifier

    if evaluator == "mlp":
        return predict_mlp(train_mlp(X_train, y_train, n_classes, seed=seed, cfg=mlp, device=device), X_test)
    if len(np.unique(y_train)) == 1:
        return np.full(X_test.shape[0], y_train[0])
    if evaluator == "logreg":
        return _predict(fit_logreg(_fit_input(X_train), y_train, seed=seed), X_test)
    if evaluator == "knn":
        counts = np.bincount(y_train)
        n_neighbors = int(max(1, min(5, counts[counts > 0].min())))
        clf = KNeighborsClassifier(n_neighbors=n_neighbors)
        return _predict(clf.fit(_dense(X_train), y_train), X_test)
    msg = f"unknown evaluator {evaluator!r}; expected one of {EVALUATORS}"
    raise ValueError(msg)


def score(y_true: np.ndarray, y_pred: np.ndarray, classes: np.ndarray | None = None) -> Scores:
    """Accuracy, macro-F1 over the classes present in y_true, per-class recall."""
    from sklearn.metrics import f1_score, recall_score

    present = np.unique(y_true) if classes is None else classes
    if len(y_true) == 0:
        return Scores(float("nan"), float("nan"), {}, 0)
    recall = recall_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    return Scores(
        accuracy=float((y_true == y_pred).mean()),
        macro_f1=float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        per_class_recall={int(c): float(r) for c, r in zip(present, recall, strict=True)},
        n_test=len(y_true),
    )


def mmd_rbf(a: np.ndarray, b: np.ndarray, max_n: int = 500, seed: int = 0) -> float:
    """RBF-MMD² (median-heuristic bandwidth) between two point sets, subsampled to max_n each."""
    rng = np.random.default_rng(seed)
    a = a[rng.permutation(len(a))[:max_n]]
    b = b[rng.permutation(len(b))[:max_n]]
    xy = np.concatenate([a, b]).astype(np.float64)
    sq = (xy**2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None] - 2 * xy @ xy.T, 0)
    bw = np.median(d2[d2 > 0]) if (d2 > 0).any() else 1.0
    k = np.exp(-d2 / bw)
    n = len(a)
    return float(k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean())


@dataclass(frozen=True)
class Fidelity:
    """How much synthetic cells look like real cells of the same classes."""

    mmd_pca: float  # RBF-MMD² in a 50-PC space fitted on the real test cells
    mean_corr: float  # Pearson correlation of per-gene means (log-normalised space), class-averaged
    var_corr: float  # the same for per-gene variances (classes with >= 2 cells on both sides)
    marker_overlap: float  # top-50 wilcoxon marker genes per class (scanpy), |real ∩ synthetic| / 50, class-averaged
    zero_fraction_real: float
    zero_fraction_synthetic: float

    def as_dict(self) -> dict[str, float]:
        """Plain dict (the keys of the evaluate reply's fidelity)."""
        return {k: float(v) for k, v in self.__dict__.items()}


MARKER_GENES = 50
MIN_MARKER_CELLS = 3  # a class needs this many cells on both sides to have its markers compared


def _class_corr(
    real: np.ndarray, yr: np.ndarray, syn: np.ndarray, ys: np.ndarray, classes: np.ndarray, stat: str
) -> float:
    corrs = []
    for c in classes:
        r, s = real[yr == c], syn[ys == c]
        if stat == "var" and (len(r) < 2 or len(s) < 2):
            continue
        a, b = (r.mean(0), s.mean(0)) if stat == "mean" else (r.var(0), s.var(0))
        if a.std() > 0 and b.std() > 0:
            corrs.append(float(np.corrcoef(a, b)[0, 1]))
    return float(np.mean(corrs)) if corrs else float("nan")


def marker_genes(X: np.ndarray, y: np.ndarray, classes: np.ndarray, n_top: int = MARKER_GENES) -> dict[int, set[int]]:
    """Top-n_top marker genes (column indices) per class: scanpy's rank_genes_groups, wilcoxon, each class vs the
    rest."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    keep = np.isin(y, classes)
    obs = pd.DataFrame(
        {"label": pd.Categorical([str(c) for c in y[keep]])}, index=[str(i) for i in range(int(keep.sum()))]
    )
    adata = ad.AnnData(X[keep].astype(np.float32), obs=obs, var=pd.DataFrame(index=[str(i) for i in range(X.shape[1])]))
    adata.uns["log1p"] = {"base": None}  # X is log1p-normalised: tells scanpy how to compute fold changes
    with torch_threads_kept():
        sc.tl.rank_genes_groups(adata, "label", method="wilcoxon", n_genes=n_top, use_raw=False)
    names = adata.uns["rank_genes_groups"]["names"]
    return {int(c): {int(g) for g in names[str(c)]} for c in classes}


def marker_overlap(
    real: np.ndarray, yr: np.ndarray, syn: np.ndarray, ys: np.ndarray, n_top: int = MARKER_GENES
) -> float:
    """Mean over classes of |markers(real) ∩ markers(synthetic)| / n_top (NaN with fewer than 2 comparable classes)."""
    rc, rn = np.unique(yr, return_counts=True)
    sc_, sn = np.unique(ys, return_counts=True)
    classes = np.intersect1d(rc[rn >= MIN_MARKER_CELLS], sc_[sn >= MIN_MARKER_CELLS])
    if len(classes) < 2 or real.shape[1] < n_top:
        return float("nan")
    a, b = marker_genes(real, yr, classes, n_top), marker_genes(syn, ys, classes, n_top)
    return float(np.mean([len(a[c] & b[c]) / n_top for c in classes]))


def fidelity(X_real: Matrix, y_real: np.ndarray, X_syn: np.ndarray, y_syn: np.ndarray, *, seed: int = 0) -> Fidelity:
    """Fidelity of synthetic cells against real cells, over the classes both have (at most FIDELITY_MAX_CELLS real
    cells)."""
    from sklearn.decomposition import PCA

    shared_classes = np.intersect1d(np.unique(y_real), np.unique(y_syn))
    rows = np.flatnonzero(np.isin(y_real, shared_classes))
    if rows.size > FIDELITY_MAX_CELLS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, FIDELITY_MAX_CELLS, replace=False))
    real = _dense(X_real[rows])
    yr = y_real[rows]
    syn = X_syn[np.isin(y_syn, shared_classes)]
    ys = y_syn[np.isin(y_syn, shared_classes)]
    nan = float("nan")
    if len(real) < 3 or len(syn) == 0:
        return Fidelity(
            nan,
            nan,
            nan,
            nan,
            float((real == 0).mean()) if real.size else nan,
            float((syn == 0).mean()) if syn.size else nan,
        )
    pca = PCA(n_components=min(50, real.shape[0] - 1, real.shape[1]), random_state=seed).fit(real)
    return Fidelity(
        mmd_pca=mmd_rbf(pca.transform(real), pca.transform(syn), seed=seed),
        mean_corr=_class_corr(real, yr, syn, ys, shared_classes, "mean"),
        var_corr=_class_corr(real, yr, syn, ys, shared_classes, "var"),
        marker_overlap=marker_overlap(real, yr, syn, ys),
        zero_fraction_real=float((real == 0).mean()),
        zero_fraction_synthetic=float((syn == 0).mean()),
    )
