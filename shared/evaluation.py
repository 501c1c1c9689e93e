"""Evaluate a (synthetic) training set: classifiers scored on real held-out cells, fidelity, privacy audit.

scikit-learn is imported inside the functions that use it: a site process that only pretrains or
distills (one process per message in deployment) does not pay for its import.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from shared.models import MLPClassifier, MLPConfig
from shared.training import dense_rows

logger = logging.getLogger(__name__)

Evaluator = Literal["mlp", "logreg", "knn"]
EVALUATORS: tuple[Evaluator, ...] = ("mlp", "logreg", "knn")
Matrix = sp.csr_matrix | np.ndarray


@dataclass(frozen=True)
class Scores:
    """Classification scores on real held-out cells."""

    accuracy: float
    macro_f1: float
    per_class_recall: dict[int, float]
    n_test: int


def _dense(X: Matrix) -> np.ndarray:
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32)


def train_mlp(X: Matrix, y: np.ndarray, n_classes: int, *, seed: int = 0, steps: int = 400, lr: float = 1e-3, batch_size: int = 256) -> MLPClassifier:
    """Train the G-256-256-C MLP for a fixed number of Adam steps (minibatches with replacement)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = MLPClassifier(MLPConfig(n_genes=X.shape[1], n_classes=n_classes))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4, fused=True)
    yt = torch.as_tensor(y, dtype=torch.long)
    model.train()
    for _ in range(steps):
        idx = rng.integers(0, X.shape[0], size=min(batch_size, X.shape[0]))
        loss = F.cross_entropy(model(dense_rows(X, idx)), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model


@torch.no_grad()
def predict_mlp(model: MLPClassifier, X: Matrix, batch_size: int = 2048) -> np.ndarray:
    """Class ids predicted by the MLP for every row of X."""
    out = [model(dense_rows(X, np.arange(i, min(i + batch_size, X.shape[0])))).argmax(1) for i in range(0, X.shape[0], batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def fit_predict(evaluator: Evaluator, X_train: Matrix, y_train: np.ndarray, X_test: Matrix, n_classes: int, *, seed: int = 0) -> np.ndarray:
    """Train `evaluator` on (X_train, y_train) and predict X_test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    if evaluator == "mlp":
        return predict_mlp(train_mlp(X_train, y_train, n_classes, seed=seed), X_test)
    if len(np.unique(y_train)) == 1:
        return np.full(X_test.shape[0], y_train[0])
    if evaluator == "logreg":
        clf = LogisticRegression(max_iter=300, C=1.0, random_state=seed)
        return clf.fit(_dense(X_train), y_train).predict(_dense(X_test))
    if evaluator == "knn":
        counts = np.bincount(y_train)
        n_neighbors = int(max(1, min(5, counts[counts > 0].min())))
        clf = KNeighborsClassifier(n_neighbors=n_neighbors)
        return clf.fit(_dense(X_train), y_train).predict(_dense(X_test))
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
    zero_fraction_real: float
    zero_fraction_synthetic: float


def fidelity(X_real: Matrix, y_real: np.ndarray, X_syn: np.ndarray, y_syn: np.ndarray, *, seed: int = 0) -> Fidelity:
    """Fidelity of synthetic cells against real cells, over the classes both have."""
    from sklearn.decomposition import PCA

    shared_classes = np.intersect1d(np.unique(y_real), np.unique(y_syn))
    real = _dense(X_real[np.isin(y_real, shared_classes)])
    yr = y_real[np.isin(y_real, shared_classes)]
    syn = X_syn[np.isin(y_syn, shared_classes)]
    ys = y_syn[np.isin(y_syn, shared_classes)]
    if len(real) < 3 or len(syn) == 0:
        return Fidelity(float("nan"), float("nan"), float((real == 0).mean()) if real.size else float("nan"), float((syn == 0).mean()) if syn.size else float("nan"))
    pca = PCA(n_components=min(50, real.shape[0] - 1, real.shape[1]), random_state=seed).fit(real)
    corrs = []
    for c in shared_classes:
        mr, ms = real[yr == c].mean(0), syn[ys == c].mean(0)
        if mr.std() > 0 and ms.std() > 0:
            corrs.append(float(np.corrcoef(mr, ms)[0, 1]))
    return Fidelity(
        mmd_pca=mmd_rbf(pca.transform(real), pca.transform(syn), seed=seed),
        mean_corr=float(np.mean(corrs)) if corrs else float("nan"),
        zero_fraction_real=float((real == 0).mean()),
        zero_fraction_synthetic=float((syn == 0).mean()),
    )


def membership_auc(X_train: Matrix, X_holdout: Matrix, X_syn: np.ndarray, *, max_n: int = 2000, seed: int = 0) -> float:
    """Membership-inference AUC: does closeness to a synthetic cell tell training from held-out cells?

    Score = minus the Euclidean distance (log-normalised gene space) to the closest synthetic
    cell; AUC of that score for training (members) vs held-out (non-members) cells. 0.5 means no
    signal; values well above 0.5 mean synthetic cells sit closer to the cells they came from.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.neighbors import NearestNeighbors

    if X_syn.shape[0] == 0 or X_train.shape[0] == 0 or X_holdout.shape[0] == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    n = min(max_n, X_train.shape[0], X_holdout.shape[0])
    tr = _dense(X_train[np.sort(rng.permutation(X_train.shape[0])[:n])])
    ho = _dense(X_holdout[np.sort(rng.permutation(X_holdout.shape[0])[:n])])
    nn_index = NearestNeighbors(n_neighbors=1).fit(X_syn)
    d_tr = nn_index.kneighbors(tr)[0][:, 0]
    d_ho = nn_index.kneighbors(ho)[0][:, 0]
    y = np.r_[np.ones(len(d_tr)), np.zeros(len(d_ho))]
    return float(roc_auc_score(y, -np.r_[d_tr, d_ho]))
