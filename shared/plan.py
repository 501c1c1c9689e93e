"""The run's plan from per-site gene statistics: the one implementation the federation and the benchmark share.

The server plans from the sites' profile replies; the in-process benchmark plans from the same
statistics of its prepared sites (``profile_of``, which the sites' profile replies come from too), so both choose the
same genes for the same cells.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from shared.data import gene_stats, select_variable_genes
from shared.protocol import ProfileReply


def plan_vocabulary(
    profiles: Sequence[ProfileReply], *, n_genes: int, allowed: Collection[str] | None = None
) -> tuple[list[str], list[str]]:
    """Return (genes, classes): the top ``n_genes`` variable genes among genes every site has, and the label union.

    Sites are taken in site-name order; genes keep the first site's order. ``allowed``: genes the
    plan may use at all (a reference's genes, for ``init-path``).
    """
    if not profiles:
        msg = "no site profiles to plan from"
        raise ValueError(msg)
    ordered = sorted(profiles, key=lambda p: p.site_name)
    common = set(ordered[0].genes).intersection(*(p.genes for p in ordered[1:]))
    genes = [g for g in ordered[0].genes if g in common and (allowed is None or g in allowed)]
    if not genes and allowed is not None:
        msg = (
            "the sites share no gene with the init-path reference; "
            "check that the reference uses the sites' gene identifiers"
        )
        raise ValueError(msg)
    if not genes:
        msg = (
            "the sites share no gene names; check that all sites use the same gene identifiers (symbols vs Ensembl IDs)"
        )
        raise ValueError(msg)
    sums, sumsq, detected = np.zeros(len(genes)), np.zeros(len(genes)), np.zeros(len(genes), np.int64)
    for p in ordered:
        pos = {g: i for i, g in enumerate(p.genes)}
        idx = np.array([pos[g] for g in genes], dtype=np.int64)
        sums += np.asarray(p.sums, np.float64)[idx]
        sumsq += np.asarray(p.sumsq, np.float64)[idx]
        detected += np.asarray(p.detected, np.int64)[idx]
    n_cells = int(sum(p.n_cells for p in ordered))
    chosen = select_variable_genes(genes, sums, sumsq, detected, n_cells, n_top=n_genes)
    classes = sorted(set().union(*(p.label_names for p in ordered)))
    return chosen, classes


def plan_center(profiles: Sequence[ProfileReply], genes: Sequence[str]) -> tuple[float, ...]:
    """Every plan gene's mean over the cells of the sites that have it, from their (under DP: released, noised) profile
    sums and cell counts; negative values clipped to 0, genes no site has 0."""
    total, n = np.zeros(len(genes)), np.zeros(len(genes))
    for p in profiles:
        pos = {g: i for i, g in enumerate(p.genes)}
        idx = np.array([pos.get(g, -1) for g in genes], dtype=np.int64)
        has = idx >= 0
        total[has] += np.asarray(p.sums, np.float64)[idx[has]]
        n[has] += int(p.n_cells)
    return tuple(float(v) for v in np.maximum(total / np.maximum(n, 1.0), 0.0))


def profile_of(name: str, X, genes: Sequence[str], labels: Sequence[str], *, has_counts: bool = False) -> ProfileReply:  # noqa: ANN001 - csr
    """A site's profile: gene statistics of its training cells ``X`` (columns ``genes``), cells per label name, count
    input or not."""
    sums, sumsq, detected = gene_stats(X)
    return profile_from_stats(
        name, genes, (sums, sumsq, detected), labels, n_cells=int(X.shape[0]), has_counts=has_counts
    )


def profile_from_stats(
    name: str,
    genes: Sequence[str],
    stats: tuple[np.ndarray, np.ndarray, np.ndarray],
    labels: Sequence[str],
    *,
    n_cells: int,
    has_counts: bool = False,
) -> ProfileReply:
    """A site's profile from the per-gene (sums, sums of squares, detection counts) of its ``n_cells`` training cells
    and their label names."""
    sums, sumsq, detected = stats
    names, counts = np.unique(np.asarray(labels, dtype=str), return_counts=True)
    return ProfileReply(
        site_name=name,
        genes=tuple(genes),
        sums=sums,
        sumsq=sumsq,
        detected=detected,
        n_cells=n_cells,
        label_names=tuple(str(n) for n in names),
        label_counts=counts.astype(np.int64),
        has_counts=has_counts,
    )
