"""Split one AnnData into sites and prepare them on a shared gene and label vocabulary (in-process)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from shared.data import PreparedSite, align_genes, prepare_site, split_hash
from shared.errors import SiteDataError
from shared.plan import plan_vocabulary, profile_of

logger = logging.getLogger(__name__)

PARTS = ("train", "val", "test")


def dirichlet_split(labels: np.ndarray, n_sites: int, *, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """Assign cells to n_sites with Dirichlet(alpha) label skew; return a site index per cell."""
    rng = np.random.default_rng(seed)
    site = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(np.full(n_sites, alpha))
        cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
        for s, part in enumerate(np.split(idx, cuts)):
            site[part] = s
    return site


def site_of_cells(
    adata: ad.AnnData, *, label_key: str, site_key: str | None = None, n_sites: int = 3, seed: int = 0
) -> np.ndarray:
    """The site name of every cell: obs[site_key] when given and present, else a Dirichlet(0.5) label-skewed split."""
    return site_of_obs(adata.obs, label_key=label_key, site_key=site_key, n_sites=n_sites, seed=seed)


def site_of_obs(
    obs: pd.DataFrame, *, label_key: str, site_key: str | None = None, n_sites: int = 3, seed: int = 0
) -> np.ndarray:
    """``site_of_cells`` from the cell annotations alone (a streamed file's obs)."""
    if site_key and site_key in obs:
        return obs[site_key].astype(str).to_numpy()
    if site_key:
        logger.info("obs[%r] not found: splitting into %d sites by Dirichlet(0.5) label skew", site_key, n_sites)
    labels = obs[label_key].astype(str).to_numpy()
    return np.char.add("site", dirichlet_split(labels, n_sites, seed=seed).astype(str))


def split_sites(
    adata: ad.AnnData, *, label_key: str, site_key: str | None = None, n_sites: int = 3, seed: int = 0
) -> dict[str, ad.AnnData]:
    """Split by `site_key` when given and present, else by a Dirichlet(0.5) label-skewed split (`site_of_cells`)."""
    col = site_of_cells(adata, label_key=label_key, site_key=site_key, n_sites=n_sites, seed=seed)
    return {str(s): adata[col == s].copy() for s in sorted(set(col))}


@dataclass(frozen=True)
class Federation:
    """Sites prepared on one gene vocabulary and one label vocabulary (global class ids)."""

    names: tuple[str, ...]
    sites: tuple[PreparedSite, ...]
    X: tuple[sp.csr_matrix, ...]  # each site's matrix aligned to `genes`
    y: tuple[np.ndarray, ...]  # each site's labels as global class ids
    genes: tuple[str, ...]
    classes: tuple[str, ...]

    def train(self, i: int) -> tuple[sp.csr_matrix, np.ndarray]:
        """Training cells and global labels of site i."""
        idx = self.sites[i].train_idx
        return self.X[i][idx], self.y[i][idx]

    def val(self, i: int) -> tuple[sp.csr_matrix, np.ndarray]:
        """Validation cells and global labels of site i (for choices; never trained on)."""
        idx = self.sites[i].val_idx
        return self.X[i][idx], self.y[i][idx]

    def test(self, i: int) -> tuple[sp.csr_matrix, np.ndarray]:
        """Held-out test cells and global labels of site i (only ever scored)."""
        idx = self.sites[i].test_idx
        return self.X[i][idx], self.y[i][idx]

    def part(self, name: str, i: int) -> tuple[sp.csr_matrix, np.ndarray]:
        """Site i's 'train', 'val' or 'test' cells."""
        if name not in PARTS:
            msg = f"unknown part {name!r}; expected one of {PARTS}"
            raise ValueError(msg)
        return getattr(self, name)(i)

    def pooled(self, part: str) -> tuple[sp.csr_matrix, np.ndarray]:
        """All sites' 'train', 'val' or 'test' cells stacked."""
        pieces = [self.part(part, i) for i in range(len(self.sites))]
        return sp.vstack([p[0] for p in pieces]).tocsr(), np.concatenate([p[1] for p in pieces])

    def split_hash(self) -> str:
        """One hash of which cells went to which site and part: equal hashes mean equal splits."""
        arrays = [
            a
            for s in self.sites
            for a in (s.rows if s.rows is not None else np.zeros(0), s.train_idx, s.val_idx, s.test_idx)
        ]
        return split_hash(*arrays)


def plan_genes(names: Sequence[str], sites: Sequence[PreparedSite], n_genes: int) -> list[str]:
    """Top variable genes from the sites' TRAINING cells only: the federation's plan (``shared.plan``) on the same
    statistics."""
    profiles = [
        profile_of(name, s.X[s.train_idx], s.genes, [s.classes[j] for j in s.labels[s.train_idx]])
        for name, s in zip(names, sites, strict=True)
    ]
    return plan_vocabulary(profiles, n_genes=n_genes)[0]


def prepare_federation(
    parts: dict[str, ad.AnnData],
    *,
    label_key: str,
    n_genes: int = 2000,
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    genes: Sequence[str] | None = None,
) -> Federation:
    """Prepare every site (contract checks, normalisation, train / validation / test split) and align them to one plan.

    ``genes``: a given plan's genes (a federation's, or a reference's); by default the plan is made
    here, with the federation's rule.
    """
    names, sites = [], []
    for name, adata in parts.items():
        try:
            sites.append(
                prepare_site(
                    adata, label_key=label_key, seed=seed, test_fraction=test_fraction, val_fraction=val_fraction
                )
            )
            names.append(name)
        except SiteDataError as exc:
            logger.warning("site %s skipped: %s", name, exc)
    if not sites:
        msg = "no site has usable data; run `scdd check` on the file to see why"
        raise SiteDataError(msg)
    genes = list(genes) if genes is not None else plan_genes(names, sites, n_genes)
    classes = sorted(set().union(*(s.classes for s in sites)))
    lookup = {c: i for i, c in enumerate(classes)}
    X = tuple(align_genes(s.X, s.genes, genes, min_coverage=0.0)[0] for s in sites)
    y = tuple(np.array([lookup[s.classes[j]] for j in s.labels], dtype=np.int64) for s in sites)
    return Federation(tuple(names), tuple(sites), X, y, tuple(genes), tuple(classes))
