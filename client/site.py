"""Site identity and data: which file and cells this SuperNode holds, prepared once and cached on local disk.

Deployment: ``node_config`` names ``data-path`` (and optionally ``site-name``, ``cache-dir``).
Simulation: ``node_config`` has ``partition-id``/``num-partitions`` and the run config names
``sim-data-path`` plus ``sim-site-key`` (the partition picks one of the column's sorted values) or,
when that column is absent, a Dirichlet label-skew split into ``sim-num-sites`` sites.
Each message may start a fresh process, so prepared matrices are cached as .npz files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import scipy.sparse as sp

from shared.errors import ConfigError, SiteDataError
from shared.io import atomic_path
from shared.protocol import SiteSpec

logger = logging.getLogger(__name__)

EXAMPLE_FILE = "kang_pbmc_muscat.h5ad"
CACHE_VERSION = (
    5  # 2: validation split; 3: library sizes; 4: streamed (explicit zeros dropped); 5: rows by split, memory-mapped
)


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
    library: np.ndarray = field(
        default_factory=lambda: np.empty(0)
    )  # count input: total counts per cell over all genes; empty otherwise

    @property
    def has_counts(self) -> bool:
        """The input held raw counts, so the plan genes' counts can be recovered
        (shared.models.vae.counts_from_lognorm)."""
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
        msg = (
            f"sim-data-path is empty and the bundled example file is not here ({path}); a Flower app bundle "
            "(FAB) holds only code. Pass the file explicitly: flwr run . --run-config "
            "\"sim-data-path='/abs/path.h5ad'\""
        )
        raise ConfigError(msg)
    return path


def resolve_source(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteSource:
    """The site's data source from the SuperNode's node config (deployment) or partition + run config (simulation)."""
    if "data-path" in node_config:
        path = Path(str(node_config["data-path"])).expanduser()
        name = str(node_config.get("site-name") or path.stem)
        return SiteSource(name=name, path=path)
    if "partition-id" not in node_config:
        msg = (
            'this SuperNode has no data: start it with --node-config \'data-path="/abs/site.h5ad" '
            'site-name="hospital-a"\' (or run a simulation, which sets partition-id)'
        )
        raise ConfigError(msg)
    partition = int(node_config["partition-id"])
    path = resolve_data_path(str(run_config.get("sim-data-path", "")))
    return SiteSource(
        name=f"partition{partition}",
        path=path,
        site_key=str(run_config.get("sim-site-key", "batch")),
        num_sites=int(run_config.get("sim-num-sites", 3)),
        partition=partition,
        split_seed=int(run_config.get("seed", 0)),
    )


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
    parts = [
        CACHE_VERSION,
        str(source.path.resolve()),
        st.st_size,
        st.st_mtime_ns,
        source.site_key,
        source.num_sites,
        source.partition,
        source.split_seed,
        spec.data_items(),
        hashlib.sha256("\n".join(genes or []).encode()).hexdigest(),
    ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _select(source: SiteSource, label_key: str, obs: Any) -> tuple[str, np.ndarray | None]:
    """This site's name and rows of the file (None: all of them), from the file's cell annotations only."""
    from shared.sites import site_of_obs

    if source.num_sites == 0 and not source.site_key:
        return source.name, None
    if source.site_key and source.site_key in obs:
        column = obs[source.site_key].astype(str).to_numpy()
        values = sorted(set(column))
        if source.partition >= len(values):
            msg = (
                f"partition {source.partition} has no site: column '{source.site_key}' has {len(values)} values; "
                f"run the simulation with num-supernodes={len(values)}"
            )
            raise SiteDataError(msg)
        name = values[source.partition]
        return name, np.flatnonzero(column == name)
    if label_key not in obs:
        msg = f"label column '{label_key}' not found in obs; set label-key to the column that holds cell types"
        raise SiteDataError(msg)
    column = site_of_obs(
        obs, label_key=label_key, site_key=None, n_sites=max(1, source.num_sites), seed=source.split_seed
    )
    name = f"site{source.partition}"
    if name not in set(column):
        msg = (
            f"partition {source.partition} has no cells in a Dirichlet split into {source.num_sites} sites; "
            f"set sim-num-sites to the number of SuperNodes"
        )
        raise SiteDataError(msg)
    return name, np.flatnonzero(column == name)


def _split_config(spec: SiteSpec) -> Any:
    from shared.data import Expect, SplitConfig

    return SplitConfig(
        spec.label_key,
        cast(Expect, spec.expect),  # one of Expect's values: SiteSpec.parse refuses any other
        spec.min_cells_per_class,
        spec.test_fraction,
        spec.val_fraction,
        spec.split_seed,
    )


def _prepare(source: SiteSource, spec: SiteSpec, genes: Sequence[str] | None, folder: Path) -> None:
    """Stream the site's rows from its file (``shared.stream.CHUNK_ROWS`` cells at a time) into the prepared matrix on
    ``genes``, written straight into memory-mapped files in ``folder`` (with meta.npz: labels, split, names, library
    sizes).

    Rows are stored training cells first, then validation, then test cells (each in file order), so that
    each part is a contiguous block: ``shared.fitting.row_view`` hands it to training without a copy.
    """
    from shared.data import build_matrix, read_cells
    from shared.stream import open_site_file

    def allocate(name: str, n: int, dtype: type) -> np.ndarray:
        path = folder / f"{name}.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n,))
        try:  # reserve the disk now: a full disk is then a clear error, not a crash while the mapping is written
            with open(path, "r+b") as fh:
                os.posix_fallocate(fh.fileno(), 0, path.stat().st_size)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                return array  # a file system without fallocate: nothing reserved, the mapping is written as it is
            msg = (
                f"not enough disk in the site cache ({folder.parent}) for the prepared cells "
                f"({path.stat().st_size / 1e9:.1f} GB for {name}; {type(exc).__name__}); free space there or set the "
                "SuperNode's cache-dir to a larger disk"
            )
            raise SiteDataError(msg) from None
        return array

    with open_site_file(source.path) as f:
        name, select = _select(source, spec.label_key, f.obs)
        cells = read_cells(f.X, f.var_names, f.obs, _split_config(spec), select=select)
        assert f.X is not None  # read_cells refused a file without X
        parts = (cells.train_idx, cells.val_idx, cells.test_idx)
        X, _ = build_matrix(f.X, cells, genes, min_coverage=spec.min_coverage, parts=parts, allocate=allocate)
    for array in (X.data, X.indices, X.indptr):
        if isinstance(array, np.memmap):
            array.flush()
    order = np.concatenate(parts)
    bounds = np.cumsum([0, *(p.size for p in parts)])
    library = cells.library[order] if cells.library is not None else np.empty(0)
    np.savez(
        folder / "meta.npz",
        shape=np.asarray(X.shape),
        labels=cells.labels[order],
        train=np.arange(bounds[0], bounds[1]),
        val=np.arange(bounds[1], bounds[2]),
        test=np.arange(bounds[2], bounds[3]),
        name=np.asarray(name),
        classes=np.asarray(cells.classes, dtype=str),
        genes=np.asarray(tuple(genes) if genes is not None else cells.genes, dtype=str),
        library=library,
    )
    logger.info(
        "site %s prepared and cached: %d cells, %d genes, %d classes", name, X.shape[0], X.shape[1], len(cells.classes)
    )


@dataclass(frozen=True, eq=False)
class SiteProfile:
    """What the profile message needs: a site's labels and split, and per-gene statistics of its training cells over all
    its genes.

    ``clipped`` (3, G): the sums the DP profile noises (``shared.privacy.mechanisms.clipped_profile_sums``); empty
    without DP.
    """

    name: str
    genes: tuple[str, ...]
    classes: tuple[str, ...]
    labels: np.ndarray
    train_idx: np.ndarray
    has_counts: bool
    sums: np.ndarray
    sumsq: np.ndarray
    detected: np.ndarray
    clipped: np.ndarray


def _profile_stats(blocks: Iterable[sp.csr_matrix], n_genes: int, clip: bool) -> tuple[np.ndarray, ...]:
    """(sums, sums of squares, detection counts, clipped sums) over normalised row blocks."""
    from shared.data import gene_stats
    from shared.privacy.mechanisms import clipped_profile_sums

    sums, sumsq, detected = np.zeros(n_genes), np.zeros(n_genes), np.zeros(n_genes, np.int64)
    clipped = np.zeros((3, n_genes)) if clip else np.zeros((0, n_genes))
    for block in blocks:
        s, q, d = gene_stats(block)
        sums, sumsq, detected = sums + s, sumsq + q, detected + d
        if clip:
            clipped += clipped_profile_sums(block)
    return sums, sumsq, detected, clipped


def profile_of_site(site: SiteData, *, clip: bool) -> SiteProfile:
    """A prepared site's profile statistics (its matrix must hold all its genes)."""
    from shared.fitting import row_view
    from shared.stream import CHUNK_ROWS

    train = row_view(site.X, site.train_idx)
    blocks = (train[a : a + CHUNK_ROWS] for a in range(0, train.shape[0], CHUNK_ROWS))
    stats = _profile_stats(blocks, len(site.genes), clip)
    return SiteProfile(site.name, site.genes, site.classes, site.labels, site.train_idx, site.has_counts, *stats)


def _stream_profile(source: SiteSource, spec: SiteSpec) -> SiteProfile:
    """The profile statistics streamed from the site's file: memory is one block, whatever the number of cells."""
    from shared.data import normalised_blocks, read_cells
    from shared.stream import open_site_file

    with open_site_file(source.path) as f:
        name, select = _select(source, spec.label_key, f.obs)
        cells = read_cells(f.X, f.var_names, f.obs, _split_config(spec), select=select)
        assert f.X is not None  # read_cells refused a file without X
        blocks = (block for _, block in normalised_blocks(f.X, cells, subset=cells.train_idx))
        stats = _profile_stats(blocks, len(cells.genes), spec.dp.enabled)
    return SiteProfile(
        name, cells.genes, cells.classes, cells.labels, cells.train_idx, cells.library is not None, *stats
    )


def load_profile(source: SiteSource, spec: SiteSpec, *, cache: Path) -> SiteProfile:
    """The site's profile statistics, from the disk cache when possible (the all-gene matrix is never held)."""
    path = cache / f"profile-{_cache_key(source, spec, None)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                cached = SiteProfile(
                    str(z["name"]),
                    tuple(str(g) for g in z["genes"]),
                    tuple(str(c) for c in z["classes"]),
                    z["labels"],
                    z["train"],
                    bool(z["has_counts"]),
                    z["sums"],
                    z["sumsq"],
                    z["detected"],
                    z["clipped"],
                )
            if cached.clipped.shape[0] or not spec.dp.enabled:
                return cached
            logger.info("profile cache %s lacks the DP-clipped sums (written without DP): computing them", path.name)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("ignoring unreadable profile cache %s (%s)", path.name, type(exc).__name__)
    p = _stream_profile(source, spec)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            name=np.asarray(p.name),
            genes=np.asarray(p.genes, dtype=str),
            classes=np.asarray(p.classes, dtype=str),
            labels=p.labels,
            train=p.train_idx,
            has_counts=np.asarray(p.has_counts),
            sums=p.sums,
            sumsq=p.sumsq,
            detected=p.detected,
            clipped=p.clipped,
        )
    return p


MATRIX = ("data", "indices", "indptr")


def _load(path: Path) -> SiteData:
    """A cached site; its matrix is memory-mapped read-only from the cache, so only the rows in use are resident."""
    data, indices, indptr = (np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in MATRIX)
    nnz = int(indptr[-1])
    with np.load(path / "meta.npz", allow_pickle=False) as z:
        X = sp.csr_matrix(tuple(int(v) for v in z["shape"]), dtype=np.float32)
        X.data, X.indices, X.indptr = (
            data[:nnz],
            indices[:nnz],
            indptr,
        )  # assigned: the constructor could copy the mapped arrays
        X.has_sorted_indices = True
        return SiteData(
            str(z["name"]),
            X,
            z["labels"],
            tuple(str(c) for c in z["classes"]),
            tuple(str(g) for g in z["genes"]),
            z["train"],
            z["test"],
            z["val"],
            z["library"],
        )


def load_site(source: SiteSource, spec: SiteSpec, genes: Sequence[str] | None, *, cache: Path) -> SiteData:
    """The site's prepared data (aligned to ``genes`` when given; all its genes otherwise), from the disk cache when
    possible.

    The cache is a folder, published by renaming a finished temporary one (a failed preparation leaves nothing behind).
    """
    path = cache / f"site-{_cache_key(source, spec, genes)}"
    if path.is_dir():
        try:
            return _load(path)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("ignoring unreadable site cache %s (%s)", path.name, type(exc).__name__)
            shutil.rmtree(path, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{path.name}."))
    try:
        _prepare(source, spec, genes, tmp)
        os.rename(tmp, path)  # atomic; fails when another process published the same cache first (theirs is kept)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(path)


def _local_path(cache: Path, source: SiteSource, key: str) -> Path:
    """One file per site, data version (the file's size and mtime, as the site cache) and ``key``."""
    try:
        st = source.path.stat()
        version = [st.st_size, st.st_mtime_ns]
    except OSError:
        version = []
    ident = json.dumps([*_selection(source), version, key])
    return cache / f"local-only-{hashlib.sha256(ident.encode()).hexdigest()[:20]}.json"


def load_local_only(cache: Path, source: SiteSource, key: str) -> dict[str, dict[str, float]] | None:
    """This site's local-only scores for ``key`` (plan digest, seed, training rule), if computed before: they do not
    change between rounds."""
    try:
        return json.loads(_local_path(cache, source, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def save_local_only(cache: Path, source: SiteSource, key: str, scores: Mapping[str, Mapping[str, float]]) -> None:
    """Keep the local-only scores (aggregates, in the site's private cache) for later rounds and runs on the same
    plan."""
    path = _local_path(cache, source, key)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(scores), encoding="utf-8")


def source_key(source: SiteSource) -> str:
    """A short identity of the site's cells (file and selection): simulated sites (and sites of one host) may share a
    cache folder."""
    return hashlib.sha256(json.dumps(_selection(source)).encode()).hexdigest()[:16]


def _selection(source: SiteSource) -> list[Any]:
    """What selects the site's cells: its file and, for a simulated site, how the file was split."""
    return [
        str(source.path.expanduser().resolve()),
        source.name,
        source.site_key,
        source.num_sites,
        source.partition,
        source.split_seed,
    ]


def _members_path(cache: Path, run_id: int, source: SiteSource) -> Path:
    """One file per run and site."""
    return cache / f"members-run{int(run_id)}-{source_key(source)}.npy"


def save_members(cache: Path, run_id: int, source: SiteSource, rows: np.ndarray) -> None:
    """Remember which of this site's cells seeded the codes of run ``run_id`` (site-local rows; never sent anywhere)."""
    path = _members_path(cache, run_id, source)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.asarray(rows, dtype=np.int64), allow_pickle=False)


def load_members(cache: Path, run_id: int, source: SiteSource) -> np.ndarray | None:
    """The rows ``save_members`` stored for ``run_id`` and this site, or None (then the seed-targeted audit is not
    computable)."""
    path = _members_path(cache, run_id, source)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        logger.warning(
            "no record of the cells that seeded this run's codes (%s): the seed-targeted audit is skipped", path.name
        )
        return None
