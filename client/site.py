"""Site identity and data: which file and cells this SuperNode holds, prepared once and cached on local disk.

Deployment: ``node_config`` names ``data-path`` (and optionally ``site-name``, ``cache-dir``).
Simulation: ``node_config`` has ``partition-id``/``num-partitions`` and the run config names
``sim-data-path`` plus ``sim-site-key`` (the partition picks one of the column's sorted values) or,
when that column is absent, a Dirichlet label-skew split into ``sim-num-sites`` sites.
Each message may start a fresh process, so prepared matrices are cached as .npz files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from shared.errors import ConfigError, SiteDataError
from shared.io import atomic_path
from shared.protocol import SiteSpec

logger = logging.getLogger(__name__)

EXAMPLE_FILE = "kang_pbmc_muscat.h5ad"
CACHE_VERSION = 3  # 2: validation split; 3: library sizes (count input)


@dataclass(frozen=True)
class SiteSource:
    """Where a site's cells come from: a file, optionally one group of a column or one Dirichlet part."""

    name: str
    path: Path
    site_key: str = ""  # obs column selecting the site's cells ("" = whole file)
    num_sites: int = 0  # > 0: Dirichlet split into this many sites when site_key is absent from obs
    partition: int = 0
    split_seed: int = 0


@dataclass(frozen=True, eq=False)
class SiteData:
    """A site's prepared cells: log-normalised CSR aligned to ``genes``, local label ids into ``classes``."""

    name: str
    X: sp.csr_matrix
    labels: np.ndarray
    classes: tuple[str, ...]
    genes: tuple[str, ...]
    train_idx: np.ndarray
    test_idx: np.ndarray
    val_idx: np.ndarray
    library: np.ndarray = field(default_factory=lambda: np.empty(0))  # count input: total counts per cell over all genes; empty otherwise

    @property
    def has_counts(self) -> bool:
        """The input held raw counts, so the plan genes' counts can be recovered (shared.models.vae.counts_from_lognorm)."""
        return self.library.shape[0] == self.X.shape[0] and self.X.shape[0] > 0

    def global_labels(self, plan_classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Return (plan class id per cell, mask of cells whose class is in the plan)."""
        lookup = {c: i for i, c in enumerate(plan_classes)}
        ids = np.array([lookup.get(c, -1) for c in self.classes], dtype=np.int64)
        y = ids[self.labels] if self.labels.size else np.zeros(0, np.int64)
        return y, y >= 0


def example_path() -> Path:
    """The example file bundled with the installed ``shared`` package (absent inside a FAB)."""
    import shared

    return Path(shared.__file__).resolve().parent / "example_data" / EXAMPLE_FILE


def resolve_data_path(value: str) -> Path:
    """The simulation data path: ``value``, or the bundled example when empty."""
    if value:
        return Path(value).expanduser()
    path = example_path()
    if not path.is_file():
        msg = (f"sim-data-path is empty and the bundled example file is not here ({path}); a Flower app bundle "
               "(FAB) holds only code. Pass the file explicitly: flwr run . --run-config "
               "\"sim-data-path='/abs/path.h5ad'\"")
        raise ConfigError(msg)
    return path


def resolve_source(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteSource:
    """The site's data source from the SuperNode's node config (deployment) or partition + run config (simulation)."""
    if "data-path" in node_config:
        path = Path(str(node_config["data-path"])).expanduser()
        name = str(node_config.get("site-name") or path.stem)
        return SiteSource(name=name, path=path)
    if "partition-id" not in node_config:
        msg = ("this SuperNode has no data: start it with --node-config 'data-path=\"/abs/site.h5ad\" "
               "site-name=\"hospital-a\"' (or run a simulation, which sets partition-id)")
        raise ConfigError(msg)
    partition = int(node_config["partition-id"])
    path = resolve_data_path(str(run_config.get("sim-data-path", "")))
    return SiteSource(name=f"partition{partition}", path=path, site_key=str(run_config.get("sim-site-key", "batch")),
                      num_sites=int(run_config.get("sim-num-sites", 3)), partition=partition, split_seed=int(run_config.get("seed", 0)))


def cache_dir(node_config: Mapping[str, Any]) -> Path:
    """The site's private cache folder (node config ``cache-dir`` or a per-user temp folder), mode 0700."""
    base = node_config.get("cache-dir")
    path = Path(str(base)) if base else Path(tempfile.gettempdir()) / f"fedscdd-cache-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _cache_key(source: SiteSource, spec: SiteSpec, genes: Sequence[str] | None) -> str:
    try:
        st = source.path.stat()
    except OSError:
        msg = f"no such file: {source.path}; pass the path of your .h5ad (data-path / sim-data-path)"
        raise SiteDataError(msg) from None
    parts = [CACHE_VERSION, str(source.path.resolve()), st.st_size, st.st_mtime_ns, source.site_key, source.num_sites,
             source.partition, source.split_seed, spec.data_items(), hashlib.sha256("\n".join(genes or []).encode()).hexdigest()]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _select_cells(source: SiteSource, label_key: str) -> tuple[str, Any]:
    """Read the file and keep this site's cells; return (site name, AnnData)."""
    from shared.data import read_h5ad
    from shared.sites import split_sites

    adata = read_h5ad(source.path)
    if source.num_sites == 0 and not source.site_key:
        return source.name, adata
    if source.site_key and source.site_key in adata.obs:
        values = sorted(set(adata.obs[source.site_key].astype(str)))
        if source.partition >= len(values):
            msg = (f"partition {source.partition} has no site: column '{source.site_key}' has {len(values)} values; "
                   f"run the simulation with num-supernodes={len(values)}")
            raise SiteDataError(msg)
        name = values[source.partition]
        return name, adata[adata.obs[source.site_key].astype(str).to_numpy() == name].copy()
    if label_key not in adata.obs:
        msg = f"label column '{label_key}' not found in obs; set label-key to the column that holds cell types"
        raise SiteDataError(msg)
    parts = split_sites(adata, label_key=label_key, site_key=None, n_sites=max(1, source.num_sites), seed=source.split_seed)
    name = f"site{source.partition}"
    if name not in parts:
        msg = (f"partition {source.partition} has no cells in a Dirichlet split into {source.num_sites} sites; "
               f"set sim-num-sites to the number of SuperNodes")
        raise SiteDataError(msg)
    return name, parts[name]


def _prepare(source: SiteSource, spec: SiteSpec, genes: Sequence[str] | None) -> SiteData:
    from shared.data import prepare_site

    name, adata = _select_cells(source, spec.label_key)
    site = prepare_site(adata, label_key=spec.label_key, expect=spec.expect, vocabulary=genes, min_coverage=spec.min_coverage,  # type: ignore[arg-type]
                        min_cells_per_class=spec.min_cells_per_class, test_fraction=spec.test_fraction, val_fraction=spec.val_fraction,
                        seed=spec.split_seed)
    library = site.library if site.library is not None else np.empty(0)
    return SiteData(name, site.X, site.labels, site.classes, site.genes, site.train_idx, site.test_idx, site.val_idx, library)


def _save(path: Path, site: SiteData) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, data=site.X.data, indices=site.X.indices, indptr=site.X.indptr, shape=np.asarray(site.X.shape),
                 labels=site.labels, train=site.train_idx, test=site.test_idx, val=site.val_idx, name=np.asarray(site.name),
                 classes=np.asarray(site.classes, dtype=str), genes=np.asarray(site.genes, dtype=str), library=site.library)


def _load(path: Path) -> SiteData:
    with np.load(path, allow_pickle=False) as z:
        X = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(int(v) for v in z["shape"]))
        return SiteData(str(z["name"]), X, z["labels"], tuple(str(c) for c in z["classes"]), tuple(str(g) for g in z["genes"]), z["train"], z["test"], z["val"],
                        z["library"])


def load_site(source: SiteSource, spec: SiteSpec, genes: Sequence[str] | None, *, cache: Path) -> SiteData:
    """The site's prepared data (aligned to ``genes`` when given), from the disk cache when possible."""
    path = cache / f"site-{_cache_key(source, spec, genes)}.npz"
    if path.is_file():
        try:
            return _load(path)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("ignoring unreadable site cache %s (%s)", path.name, type(exc).__name__)
    site = _prepare(source, spec, genes)
    _save(path, site)
    logger.info("site %s prepared and cached: %d cells, %d genes, %d classes", site.name, site.X.shape[0], len(site.genes), len(site.classes))
    return site


def _local_path(cache: Path, source: SiteSource, key: str) -> Path:
    """One file per site, data version (the file's size and mtime, as the site cache) and ``key``."""
    try:
        st = source.path.stat()
        version = [st.st_size, st.st_mtime_ns]
    except OSError:
        version = []
    ident = json.dumps([str(source.path.expanduser().resolve()), source.name, source.site_key, source.num_sites, source.partition, source.split_seed,
                        version, key])
    return cache / f"local-only-{hashlib.sha256(ident.encode()).hexdigest()[:20]}.json"


def load_local_only(cache: Path, source: SiteSource, key: str) -> dict[str, dict[str, float]] | None:
    """This site's local-only scores for ``key`` (plan digest, seed, training rule), if computed before: they do not change between rounds."""
    try:
        return json.loads(_local_path(cache, source, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def save_local_only(cache: Path, source: SiteSource, key: str, scores: Mapping[str, Mapping[str, float]]) -> None:
    """Keep the local-only scores (aggregates, in the site's private cache) for later rounds and runs on the same plan."""
    path = _local_path(cache, source, key)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(scores), encoding="utf-8")


def source_key(source: SiteSource) -> str:
    """A short identity of the site's cells (file and selection): simulated sites (and sites of one host) may share a cache folder."""
    ident = json.dumps([str(source.path.expanduser().resolve()), source.name, source.site_key, source.num_sites, source.partition, source.split_seed])
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _members_path(cache: Path, run_id: int, source: SiteSource) -> Path:
    """One file per run and site."""
    return cache / f"members-run{int(run_id)}-{source_key(source)}.npy"


def save_members(cache: Path, run_id: int, source: SiteSource, rows: np.ndarray) -> None:
    """Remember which of this site's cells seeded the codes of run ``run_id`` (site-local rows; never sent anywhere)."""
    path = _members_path(cache, run_id, source)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.asarray(rows, dtype=np.int64), allow_pickle=False)


def load_members(cache: Path, run_id: int, source: SiteSource) -> np.ndarray | None:
    """The rows ``save_members`` stored for ``run_id`` and this site, or None (then the seed-targeted audit is not computable)."""
    path = _members_path(cache, run_id, source)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        logger.warning("no record of the cells that seeded this run's codes (%s): the seed-targeted audit is skipped", path.name)
        return None
