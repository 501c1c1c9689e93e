"""Privacy audit of a synthetic set, run where the real cells are (a site): only the numbers leave.

- ``seed_mia``: seed-targeted membership inference. Members are the cells that seeded the synthetic
  cells (whose latents initialised codes, or that a coreset / DM picked), non-members held-out
  cells; score = minus the distance to the closest synthetic cell. A copied cell scores 1.0.
- ``population_mia``: the same attack with every training cell as a member (the audit of the first
  release, renamed). Blind to a few copied cells among thousands (benchmarks/results/design_choices.md).
- ``density_mia``: a density-ratio attack in the style of DOMIAS (van Breugel et al., AISTATS
  2023) on the seed members: score = log p_synthetic(x) - log p_reference(x), both k-NN density
  estimates, the reference being cells never trained on (validation cells). It flags cells
  around which the synthetic set is denser than the population, not just cells with a close
  neighbour: a synthetic cell near a member in a sparse region counts more than one in a crowd.
- ``dcr_share``: distance-to-closest-record share, the fraction of synthetic cells closer to a
  training cell than to a held-out cell, with as many training as held-out cells of each class
  (the seed members always among the training ones). 0.5 means no preference; copies give 1.0.
- ``seed_mia_null95``, ``population_mia_null95``, ``density_mia_null95``: how high each of the
  three AUCs goes without any membership signal at this site's sizes: the 95th percentile of the
  same AUC with members and non-members exchanged at random within each class (NULL_PERMUTATIONS
  times, seeded). An AUC above its bound is evidence of leakage at the 5 % level; one below it
  cannot be told from chance with this many cells (60 members against 60 held-out cells: a bound
  of 0.59, so a score of 0.58 there says nothing either way).

Members (k per class) and held-out cells (the site's class mix) differ in their classes; every
comparison is class-matched (`class_weights`), or an attack would "find" class membership.

0.5 is ideal for all four. These are attacks, so they bound the risk from below ("the DCR
delusion", arXiv 2505.01524): a low score is no guarantee, a high one is a leak. Distances are
Euclidean in the log-normalised gene space of the plan. scikit-learn is imported inside the
functions (a site process that only distills does not pay for it).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, TypeAlias, cast

import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)

Matrix: TypeAlias = sp.csr_matrix | np.ndarray
AUDIT_KEYS = (
    "seed_mia",
    "population_mia",
    "density_mia",
    "dcr_share",
    "seed_mia_null95",
    "population_mia_null95",
    "density_mia_null95",
)
NULL_PERMUTATIONS = 200  # the 95th percentile of 200 draws moves by about 0.01 between seeds at 60 + 60 cells
MIN_CELLS = 5  # fewer members, held-out or reference cells than this: the score is not computable (NaN)
REFERENCE_K = 5  # neighbours of the reference density estimate
TINY = 1e-8  # distances below this count as 0 (a copy)


@dataclass(frozen=True)
class Audit:
    """The four audit scores of one synthetic set at one site, and the three AUCs' bounds without signal (NaN where not
    computable)."""

    seed_mia: float
    population_mia: float
    density_mia: float
    dcr_share: float
    seed_mia_null95: float = float("nan")
    population_mia_null95: float = float("nan")
    density_mia_null95: float = float("nan")

    def as_dict(self) -> dict[str, float]:
        """Plain dict keyed by AUDIT_KEYS."""
        return {k: float(v) for k, v in asdict(self).items()}


def _dense(X: Matrix) -> np.ndarray:
    return np.asarray(cast(Any, X).toarray() if sp.issparse(X) else X, dtype=np.float32)  # Any: scipy is untyped


def _sample(n_total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.permutation(n_total)[:n])


def class_weights(member_labels: np.ndarray, other_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights that give the non-members the members' class mix (classes missing on either side weigh 0).

    Seed members are k per class (class-balanced) while held-out cells follow the site's class
    proportions; unweighted, a rare class's cells sit closer to the (class-balanced) synthetic set
    and an attack "detects" membership that is only class membership. Measured on pbmc_sorted,
    per-class Gaussian samples (no member is special) scored 0.70 seed-targeted unweighted.
    """
    classes, m = np.unique(member_labels, return_counts=True)
    h = np.array([np.sum(other_labels == c) for c in classes])
    w_other = np.zeros(len(other_labels))
    for c, mc, hc in zip(classes, m, h, strict=True):
        if hc:
            w_other[other_labels == c] = mc / hc
    w_member = np.isin(member_labels, classes[h > 0]).astype(np.float64)
    return w_member, w_other


@dataclass(frozen=True)
class Scored:
    """One attack's scores: members and non-members with their classes."""

    member: np.ndarray
    other: np.ndarray
    member_labels: np.ndarray
    other_labels: np.ndarray


def _auc(s: Scored) -> float:
    """AUC of members over non-members, non-members reweighted to the members' class mix."""
    from sklearn.metrics import roc_auc_score

    w_member, w_other = class_weights(s.member_labels, s.other_labels)
    if (w_member > 0).sum() < MIN_CELLS or (w_other > 0).sum() < MIN_CELLS:
        return float("nan")
    y = np.r_[np.ones(len(s.member)), np.zeros(len(s.other))]
    return float(roc_auc_score(y, np.r_[s.member, s.other], sample_weight=np.r_[w_member, w_other]))


def auc_of(s: Scored | None) -> float:
    """The attack's AUC (``_auc``); NaN without scores (too few cells)."""
    return float("nan") if s is None else _auc(s)


def null_bound(s: Scored, rng: np.random.Generator, n_perm: int = NULL_PERMUTATIONS, q: float = 0.95) -> float:
    """The ``q`` quantile of ``_auc`` when membership carries no signal: within each class, which of its scored cells
    are members is drawn at random (the class's member and non-member counts kept, so the class weights are too)."""
    if not np.isfinite(_auc(s)):
        return float("nan")
    labels = np.r_[s.member_labels, s.other_labels]
    is_member = np.r_[np.ones(len(s.member), bool), np.zeros(len(s.other), bool)]
    w_member, w_other = class_weights(s.member_labels, s.other_labels)  # per class: unchanged by the permutations
    w_as_member, w_as_other = np.zeros(len(labels)), np.zeros(len(labels))
    for c in np.unique(labels):
        at = labels == c
        w_as_member[at] = w_member[s.member_labels == c].max(initial=0.0)
        w_as_other[at] = w_other[s.other_labels == c].max(initial=0.0)
    _, tie = np.unique(np.r_[s.member, s.other], return_inverse=True)  # rank groups of equal scores
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    draws = []
    for _ in range(n_perm):
        shuffled = is_member.copy()
        for g in groups:
            shuffled[g] = is_member[g][rng.permutation(len(g))]
        draws.append(ranked_auc(tie, np.where(shuffled, w_as_member, 0.0), np.where(shuffled, 0.0, w_as_other)))
    return float(np.quantile(draws, q))


def ranked_auc(tie: np.ndarray, w_member: np.ndarray, w_other: np.ndarray) -> float:
    """Weighted AUC from rank groups (``tie``: each cell's group of equal scores, in increasing order) and each cell's
    weight as a member and as a non-member (0 on the side it is not on): what ``roc_auc_score`` gives with those
    sample weights, in O(n) (the permutations of ``null_bound`` call it 200 times per attack)."""
    n = int(tie.max()) + 1
    m = np.bincount(tie, w_member, minlength=n)
    o = np.bincount(tie, w_other, minlength=n)
    below = np.cumsum(o) - o  # non-member weight strictly below each group
    return float((m * (below + 0.5 * o)).sum() / (m.sum() * o.sum()))


def _nn_distance(X_syn: np.ndarray, queries: np.ndarray) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=1).fit(X_syn).kneighbors(queries)[0][:, 0]


def distance_scores(
    members: Matrix, member_labels: np.ndarray, non_members: Matrix, other_labels: np.ndarray, X_syn: np.ndarray
) -> Scored | None:
    """Minus the distance to the closest synthetic cell, for members and non-members (None: too few cells)."""
    if X_syn.shape[0] == 0 or min(members.shape[0], non_members.shape[0]) < MIN_CELLS:
        return None
    return Scored(
        -_nn_distance(X_syn, _dense(members)), -_nn_distance(X_syn, _dense(non_members)), member_labels, other_labels
    )


def density_scores(
    members: Matrix,
    member_labels: np.ndarray,
    non_members: Matrix,
    other_labels: np.ndarray,
    reference: Matrix,
    X_syn: np.ndarray,
) -> Scored | None:
    """DOMIAS-style scores: the synthetic set's density at a cell over the reference population's density there.

    Both densities are k-nearest-neighbour estimates, p(x) ~ k / (n * r_k(x)^D) (Loftsgaarden &
    Quesenberry 1965), so the log ratio ranks cells by D * (log r_ref(x) - log r_syn(x)): the
    synthetic set's 1-NN radius against the reference cells' k-NN radius (k = 5). A kernel density
    estimate with a bandwidth rule was tried first: it scored copies of 50 training cells only
    0.74-0.89 on kang (10-50 PCs), the k-NN ratio scores them 1.0. Non-members are class-matched.
    """
    from sklearn.neighbors import NearestNeighbors

    ref = _dense(reference)
    if X_syn.shape[0] == 0 or min(ref.shape[0], members.shape[0], non_members.shape[0]) < MIN_CELLS:
        return None
    ref_index = NearestNeighbors(n_neighbors=min(REFERENCE_K, ref.shape[0])).fit(ref)

    def log_ratio(X: Matrix) -> np.ndarray:
        q = _dense(X)
        return np.log(ref_index.kneighbors(q)[0][:, -1] + TINY) - np.log(_nn_distance(X_syn, q) + TINY)

    return Scored(log_ratio(members), log_ratio(non_members), member_labels, other_labels)


def dcr_share(
    train: Matrix,
    y_train: np.ndarray,
    members: np.ndarray,
    holdout: Matrix,
    y_holdout: np.ndarray,
    X_syn: np.ndarray,
    *,
    aligned: bool = False,
    max_n: int = 2000,
    seed: int = 0,
) -> float:
    """Share of synthetic cells closer to a training cell than to a held-out cell (ties count half).

    Per class, as many training as held-out cells are compared (the smaller count; at most max_n
    in all), so neither side is nearer by its class mix; the seed members are always among the
    training cells (that many of them drawn when there are more), so a copied cell always counts.
    With ``aligned`` (members[i] seeded synthetic cell i) only the synthetic cells whose seed was
    drawn are scored: otherwise copies of seeds left out would be scored against a sample that
    lacks them.
    """
    rng = np.random.default_rng(seed)
    members = np.asarray(members, dtype=np.int64)
    classes = np.intersect1d(np.unique(y_train), np.unique(y_holdout))
    n = {int(c): int(min(np.sum(y_train == c), np.sum(y_holdout == c))) for c in classes}
    scale = min(1.0, max_n / max(sum(n.values()), 1))
    tr_rows, ho_rows, kept = [], [], []
    for c, nc in n.items():
        nc = int(nc * scale)
        mine = np.flatnonzero(y_train[members] == c)  # positions in `members`
        take = mine if len(mine) <= nc else mine[_sample(len(mine), nc, rng)]
        chosen = np.unique(members[take])
        others = np.setdiff1d(np.flatnonzero(y_train == c), chosen)
        tr_rows.append(np.concatenate([chosen, others[_sample(len(others), nc - len(chosen), rng)]]))
        ho = np.flatnonzero(y_holdout == c)
        ho_rows.append(ho[_sample(len(ho), nc, rng)])
        kept.append(take)
    tr, ho = (
        np.sort(np.concatenate(tr_rows or [np.zeros(0, np.int64)])),
        np.sort(np.concatenate(ho_rows or [np.zeros(0, np.int64)])),
    )
    syn = X_syn[np.sort(np.concatenate(kept))] if aligned and len(members) == X_syn.shape[0] and kept else X_syn
    if syn.shape[0] == 0 or min(len(tr), len(ho)) < MIN_CELLS:
        return float("nan")
    d_tr = _nn_distance(_dense(train[tr]), syn)
    d_ho = _nn_distance(_dense(holdout[ho]), syn)
    return float(np.mean(d_tr < d_ho) + 0.5 * np.mean(d_tr == d_ho))


def audit(
    train: Matrix,
    y_train: np.ndarray,
    members: np.ndarray,
    holdout: Matrix,
    y_holdout: np.ndarray,
    reference: Matrix,
    X_syn: np.ndarray,
    *,
    aligned: bool = False,
    max_n: int = 2000,
    seed: int = 0,
) -> Audit:
    """All four scores for one site, and the chance bounds of its three AUCs (`null_bound`, drawn from `seed`).

    ``train``, ``y_train``: the site's training cells and labels; ``members``: row indices into
    ``train`` of the cells that seeded the synthetic set; ``holdout``, ``y_holdout``: held-out
    (test) cells, the non-members; ``reference``: other cells never trained on (validation cells),
    the population for the density attack; ``aligned``: members[i] seeded synthetic cell i (a site
    auditing its own set; see `dcr_share`). Non-members are compared class-matched (`class_weights`).
    """
    rng = np.random.default_rng(seed)
    members = np.asarray(members, dtype=np.int64)
    y_train, y_holdout = np.asarray(y_train), np.asarray(y_holdout)
    hold = _sample(holdout.shape[0], min(max_n, holdout.shape[0]), rng)
    seeds = np.sort(members[:max_n])
    pop = _sample(train.shape[0], min(max_n, train.shape[0], len(hold)), rng)
    ref = reference[_sample(reference.shape[0], min(max_n, reference.shape[0]), rng)]
    X_hold, y_hold = holdout[hold], y_holdout[hold]
    seed_s = distance_scores(train[seeds], y_train[seeds], X_hold, y_hold, X_syn)
    pop_s = distance_scores(train[pop], y_train[pop], X_hold, y_hold, X_syn)
    dens_s = density_scores(train[seeds], y_train[seeds], X_hold, y_hold, ref, X_syn)
    bound = lambda s: float("nan") if s is None else null_bound(s, rng)  # noqa: E731
    return Audit(
        seed_mia=auc_of(seed_s),
        population_mia=auc_of(pop_s),
        density_mia=auc_of(dens_s),
        dcr_share=dcr_share(
            train, y_train, members, holdout, y_holdout, X_syn, aligned=aligned, max_n=max_n, seed=seed
        ),
        seed_mia_null95=bound(seed_s),
        population_mia_null95=bound(pop_s),
        density_mia_null95=bound(dens_s),
    )


def random_members(labels: np.ndarray, counts: dict[int, int], seed: int) -> np.ndarray:
    """Stand-in members for a method that privileges no cell (e.g. per-class Gaussians): counts[c] random cells of each
    class c."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in counts.items()]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)
