"""Site data contract: read, check, normalise, align and split one site's AnnData, in memory or streamed from its file.

Error and log text never holds expression values or cell ids (it may reach the coordinator).
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from shared.errors import ConfigError, SiteDataError
from shared.stream import Rows, check_path, memory_rows, not_anndata, open_site_file

logger = logging.getLogger(__name__)

InputKind = Literal["counts", "lognorm"]
Expect = Literal["auto", "counts", "lognorm"]
TARGET_SUM = 1e4
SAMPLE_SIZE = 200_000  # stored non-zero values inspected by detect_kind (deterministic stride)
MAX_NONINT_COUNTS = 0.05  # share of non-integer values still read as plain counts
MAX_NONINT_FRACTIONAL = 0.75  # above this share (with large values) data is not counts
LOGNORM_MAX = 25.0  # log-normalised values (log1p or log2 of CPM) stay below this
MAX_LABEL_CLASSES_SHOWN = 20
_MISSING_LABELS = frozenset({"", "nan", "na", "n/a", "none", "null", "<na>"})
_TARGET_TEXT = f"1e{round(math.log10(TARGET_SUM))}"  # "1e4", for messages
_FIX_RAW = "provide raw counts or log-normalised values, e.g. adata.raw or adata.layers['counts']"


def _warn(msg: str) -> None:
    """Log ``msg`` and emit it as a UserWarning attributed to the public function's caller."""
    logger.warning(msg)
    warnings.warn(msg, UserWarning, stacklevel=3)


def read_h5ad(path: str | Path) -> anndata.AnnData:
    """Read a site's .h5ad file whole, refusing missing paths, directories and non-AnnData files."""
    p = check_path(path)
    try:
        adata = anndata.read_h5ad(p)
    except Exception as exc:  # noqa: BLE001 - any reader failure means "not a readable .h5ad"
        raise not_anndata(p, exc) from None
    return adata


def _check_matrix(rows: Rows) -> None:
    """Refuse an empty or non-numeric matrix."""
    n_cells, n_genes = rows.shape
    if n_cells == 0 or n_genes == 0:
        msg = (
            f"X is empty ({n_cells} cells x {n_genes} genes); expected at least one cell and one "
            "gene; check that filtering/subsetting did not remove everything before adata.write_h5ad"
        )
        raise SiteDataError(msg)
    if rows.dtype.kind not in "iuf":
        msg = (
            f"X has non-numeric dtype {rows.dtype.name}; expected integer or float expression values; "
            "convert it (adata.X = adata.X.astype('float32')) or " + _FIX_RAW
        )
        raise SiteDataError(msg)


@dataclass
class ValueScan:
    """One pass over the stored values of a site's rows: the contract's value checks, the counts-or-lognorm evidence,
    each gene's non-zeros and each cell's total. Blocks come in row order; the kind sample takes every ``step``-th
    stored value."""

    n_genes: int
    step: int
    dtype_kind: str
    position: int = 0
    n_nan: int = 0
    n_inf: int = 0
    n_neg: int = 0
    vmax: float = -math.inf
    samples: list[np.ndarray] = field(default_factory=list)
    totals: list[np.ndarray] = field(default_factory=list)
    gene_nnz: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.gene_nnz = np.zeros(self.n_genes, np.int64)

    def add(self, block: sp.csr_matrix) -> None:
        """Take in the next rows."""
        data = block.data
        if data.dtype.kind == "f":
            self.n_nan += int(np.count_nonzero(np.isnan(data)))
            self.n_inf += int(np.count_nonzero(np.isinf(data)))
        self.n_neg += int(np.count_nonzero(data < 0))
        nonzero = data != 0
        if nonzero.any():
            finite = data[nonzero & np.isfinite(data)] if data.dtype.kind == "f" else data[nonzero]
            if finite.size:
                self.vmax = max(self.vmax, float(finite.max()))
        first = (-self.position) % self.step
        picked = data[first :: self.step]
        self.samples.append(picked[picked != 0].astype(np.float64))
        self.position += data.size
        self.gene_nnz += np.bincount(block.indices[nonzero], minlength=self.n_genes)
        self.totals.append(np.asarray(block.sum(axis=1)).ravel().astype(np.float64))

    def kind(self) -> InputKind:
        """Raw counts or log-normalised values, refusing NaN/Inf, negative, all-zero and un-logged normalised data."""
        if self.n_nan or self.n_inf:
            msg = (
                f"X contains {self.n_nan + self.n_inf} NaN/Inf entries ({self.n_nan} NaN, {self.n_inf} Inf); expected "
                "finite values; fix the step that produced them and " + _FIX_RAW
            )
            raise SiteDataError(msg)
        if self.n_neg:
            msg = f"X contains {self.n_neg} negative entries: it looks z-scored/scaled (e.g. sc.pp.scale); " + _FIX_RAW
            raise SiteDataError(msg)
        if self.vmax == -math.inf:
            msg = (
                "X is all zeros: no expression at all; expected raw counts or log-normalised values; "
                "check that the right layer was written, e.g. adata.X = adata.layers['counts']"
            )
            raise SiteDataError(msg)
        if self.dtype_kind in "iu":
            return "counts"
        sample = np.concatenate(self.samples) if self.samples else np.zeros(0)
        return _kind_of(float(np.mean(sample != np.floor(sample))) if sample.size else 0.0, self.vmax)


def _kind_of(nonint: float, vmax: float) -> InputKind:
    """Counts or log-normalised from the share of non-integer values and the largest value."""
    if nonint <= MAX_NONINT_COUNTS:
        return "counts"
    if vmax <= LOGNORM_MAX:
        if vmax > math.log1p(TARGET_SUM) + 0.5:
            _warn(
                f"X looks log-normalised but exceeds log1p({_TARGET_TEXT}): the site may have used "
                f"another scale factor (e.g. logCPM); other sites use {_TARGET_TEXT} + log1p, so "
                "provide raw counts if you can"
            )
        return "lognorm"
    if nonint <= MAX_NONINT_FRACTIONAL:
        _warn(
            f"X holds large values of which {nonint:.0%} are non-integer; treating them as fractional "
            "estimated counts (e.g. RSEM/Salmon/C1 read estimates); provide integer counts if you have them"
        )
        return "counts"
    msg = (
        f"X holds large non-integer values ({nonint:.0%} of stored values non-integer, max above "
        f"{LOGNORM_MAX:g}): looks like un-logged normalised data (CPM/TPM?); apply sc.pp.log1p or "
        "provide raw counts; if these are fractional counts, round them (X.data = np.rint(X.data))"
    )
    raise SiteDataError(msg)


def scan_values(rows: Rows, select: np.ndarray, *, chunk_rows: int | None = None) -> ValueScan:
    """Pass 1 over the rows ``select`` (sorted positions) of a matrix; ``.kind()`` gives the verdict."""
    _check_matrix(rows)
    stored = int(rows.stored[select].sum())
    scan = ValueScan(n_genes=rows.shape[1], step=max(1, math.ceil(stored / SAMPLE_SIZE)), dtype_kind=rows.dtype.kind)
    for _, block in rows.blocks(select, chunk_rows):
        scan.add(block)
    return scan


def detect_kind(X: Any) -> InputKind:
    """Decide whether X holds raw counts or log-normalised values, refusing anything else."""
    rows = memory_rows(X)
    return scan_values(rows, np.arange(rows.shape[0])).kind()


def _to_csr32(X: Any) -> sp.csr_matrix:
    """Return a canonical CSR float32 copy of X (sparse stays sparse)."""
    source = X if sp.issparse(X) else np.asarray(X)
    out = sp.csr_matrix(source, dtype=np.float32, copy=True)
    out.sum_duplicates()
    return out


def normalize(X: Any, kind: InputKind) -> sp.csr_matrix:
    """Return log1p(TARGET_SUM-normalised) counts, or log-normalised input as is, as CSR float32 (row by row)."""
    if kind not in ("counts", "lognorm"):
        msg = f"unknown input kind {kind!r}; expected 'counts' or 'lognorm'"
        raise ConfigError(msg)
    out = _to_csr32(X)
    if kind == "lognorm":
        return out
    totals = np.asarray(out.sum(axis=1, dtype=np.float64)).ravel()
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
    scaled = out.data.astype(np.float64) * np.repeat(scale, np.diff(out.indptr))
    out.data = np.log1p(scaled).astype(np.float32)
    return out


def _label_strings(series: pd.Series, label_key: str) -> np.ndarray:
    """Return labels as an object array of strings (NaN where missing); refuse continuous columns."""
    is_cat = isinstance(series.dtype, pd.CategoricalDtype)
    base = series.cat.categories.dtype if is_cat else series.dtype
    present = series.notna().to_numpy()
    out = np.full(len(series), np.nan, dtype=object)
    values = series.to_numpy(dtype=object)[present]
    if pd.api.types.is_numeric_dtype(base) and not pd.api.types.is_bool_dtype(base):
        num = values.astype(np.float64)
        integral = bool(np.all(np.isfinite(num) & (num == np.round(num))))
        n_distinct = int(np.unique(num).size)
        if (not integral and n_distinct > 50) or (n_distinct > 0.5 * num.size and n_distinct > 10):
            msg = (
                f"label column '{label_key}' looks continuous, not a class label ({n_distinct} distinct "
                f"numeric values over {num.size} cells); expected cell-type names; pass --label-key "
                "with the obs column that holds cell types"
            )
            raise SiteDataError(msg)
        strings = num.astype(np.int64).astype(str) if integral else num.astype(str)
    else:
        strings = np.array([str(v).strip() for v in values], dtype=object)
    out[present] = strings
    blank = pd.Series(out, dtype=object).str.lower().isin(_MISSING_LABELS).to_numpy()
    out[blank] = np.nan
    return out


def _class_list(counts: pd.Series) -> str:
    """Return 'name (n), ...' for at most MAX_LABEL_CLASSES_SHOWN classes."""
    items = [f"{name} ({int(n)})" for name, n in counts.items()]
    extra = len(items) - MAX_LABEL_CLASSES_SHOWN
    return ", ".join(items[:MAX_LABEL_CLASSES_SHOWN]) + (f", ... and {extra} more" if extra > 0 else "")


def check_labels(adata: anndata.AnnData, *, label_key: str, min_cells_per_class: int = 2) -> pd.Categorical:
    """Return the cells' class labels (NaN for missing or too-small classes), refusing unusable columns."""
    return _labels(adata.obs, label_key, min_cells_per_class)


def _labels(obs: pd.DataFrame, label_key: str, min_cells_per_class: int) -> pd.Categorical:
    if min_cells_per_class < 1:
        msg = f"min_cells_per_class must be >= 1, got {min_cells_per_class}"
        raise ConfigError(msg)
    if label_key not in obs.columns:
        cols = [str(c) for c in obs.columns]
        shown = ", ".join(cols[:20]) + (f", ... ({len(cols)} in all)" if len(cols) > 20 else "")
        msg = (
            f"label column '{label_key}' not found in obs (available: {shown or 'none'}); "
            "pass --label-key with the obs column that holds cell types"
        )
        raise SiteDataError(msg)
    labels = _label_strings(obs[label_key], label_key)
    missing = pd.isna(labels)
    n_missing = int(missing.sum())
    if n_missing == labels.size:
        msg = (
            f"label column '{label_key}' has no labels: all {n_missing} cells are missing (NaN/empty); "
            "expected a cell-type name per cell; fill it or pass --label-key with the right column"
        )
        raise SiteDataError(msg)
    if n_missing:
        _warn(f"{n_missing} of {labels.size} cells have no label in '{label_key}'; they are dropped")
    counts = pd.Series(labels[~missing]).value_counts().sort_index()
    kept = [str(c) for c in counts.index[counts >= min_cells_per_class]]
    small = counts[counts < min_cells_per_class]
    if not kept:
        msg = (
            f"too few cells per class: need >= {min_cells_per_class} cells in at least one class, but "
            f"every class has fewer ({len(counts)} classes); add labelled cells or merge rare classes"
        )
        raise SiteDataError(msg)
    if len(small):
        _warn(f"dropping {len(small)} class(es) with fewer than {min_cells_per_class} cells: {_class_list(small)}")
    if len(kept) == 1:
        _warn(
            f"only one class ('{kept[0]}') at this site: a sorted population is fine; it will "
            "contribute codes for that class only"
        )
    return pd.Categorical(labels, categories=kept)


def check_genes(var_names: Sequence[str] | pd.Index) -> None:
    """Refuse an empty gene list, missing gene names and duplicated gene names."""
    names = pd.Index(var_names)
    if len(names) == 0:
        msg = (
            "the data has no genes (0 var_names); expected one column per gene named in var_names; "
            "write the full cells x genes matrix with adata.write_h5ad"
        )
        raise SiteDataError(msg)
    n_na = int(names.isna().sum())
    if n_na:
        msg = f"{n_na} gene names are missing (NaN); expected a name per gene; fill adata.var_names"
        raise SiteDataError(msg)
    n_dup = int(names.duplicated().sum())
    if n_dup:
        msg = (
            f"{n_dup} duplicated gene names in var_names; expected unique gene identifiers; "
            "run adata.var_names_make_unique() (or sum the duplicates) before writing the file"
        )
        raise SiteDataError(msg)


def column_map(
    genes: Sequence[str], vocabulary: Sequence[str], *, min_coverage: float = 0.5
) -> tuple[np.ndarray, float]:
    """Per input gene its column in ``vocabulary`` (-1: not in it), and the share of the vocabulary present, refusing
    low coverage."""
    genes = [str(g) for g in genes]
    vocab = [str(g) for g in vocabulary]
    check_genes(genes)
    if not vocab or len(set(vocab)) != len(vocab):
        msg = f"the plan's gene vocabulary must be non-empty and unique ({len(vocab)} names given)"
        raise ValueError(msg)
    target = {g: i for i, g in enumerate(vocab)}
    colmap = np.array([target.get(g, -1) for g in genes], dtype=np.int64)
    n_hit = int(np.count_nonzero(colmap >= 0))
    coverage = n_hit / len(vocab)
    if n_hit == 0:
        msg = (
            f"no overlap with the plan's genes (0 of {len(vocab)}); check gene identifiers "
            "(symbols vs Ensembl IDs, version suffixes, case) and rename adata.var_names to match"
        )
        raise SiteDataError(msg)
    if coverage < min_coverage:
        msg = (
            f"gene coverage too low: {n_hit} of the plan's {len(vocab)} genes ({coverage:.1%}) are "
            f"present, at least {min_coverage:.0%} required; check gene identifiers (symbols vs "
            "Ensembl IDs) or provide the unfiltered gene set"
        )
        raise SiteDataError(msg)
    return colmap, coverage


def remap_columns(block: sp.csr_matrix, colmap: np.ndarray, n_out: int) -> sp.csr_matrix:
    """``block``'s columns moved to ``colmap`` (-1 dropped), explicit zeros dropped, indices sorted: a canonical CSR."""
    cols = colmap[block.indices]
    kept = (cols >= 0) & (block.data != 0)
    row_of = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
    indptr = np.zeros(block.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of[kept], minlength=block.shape[0]), out=indptr[1:])
    out = sp.csr_matrix((block.data[kept], cols[kept], indptr), shape=(block.shape[0], n_out))
    out.sort_indices()
    return out


def align_genes(
    X: Any, genes: Sequence[str], vocabulary: Sequence[str], *, min_coverage: float = 0.5
) -> tuple[sp.csr_matrix, float]:
    """Return X with columns reordered to ``vocabulary`` (missing genes as zero columns) and the coverage."""
    if X.shape[1] != len(genes):
        msg = f"X has {X.shape[1]} columns but {len(genes)} gene names were given"
        raise ValueError(msg)
    colmap, coverage = column_map(genes, vocabulary, min_coverage=min_coverage)
    out = remap_columns(_to_csr32(X), colmap, len(vocabulary))
    logger.debug("aligned %d genes to a vocabulary of %d (coverage %.3f)", len(genes), len(vocabulary), coverage)
    return out, coverage


def stratified_split(
    labels: np.ndarray, *, test_fraction: float = 0.2, val_fraction: float = 0.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split cell indices per class into sorted train, validation and test index arrays (deterministic per seed).

    Per class (after one seeded permutation): the first round(n * test_fraction) cells are test
    cells (at least 1 when n >= 2), the next round(n * val_fraction) validation cells (at least 1
    when n >= 3 and val_fraction > 0), the rest training cells; every class keeps at least one
    training cell. The test cells do not depend on val_fraction.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        msg = f"labels must be 1-D, got shape {y.shape}"
        raise ValueError(msg)
    if not (0.0 <= test_fraction < 1.0 and 0.0 <= val_fraction < 1.0 and test_fraction + val_fraction < 1.0):
        msg = (
            f"test_fraction and val_fraction must be in [0, 1) with a sum below 1, "
            f"got {test_fraction} and {val_fraction}"
        )
        raise ConfigError(msg)
    rng = np.random.default_rng(seed)
    tests: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    vals: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    if y.size:
        _, inverse = np.unique(y, return_inverse=True)
        order = np.argsort(inverse.ravel(), kind="stable")
        bounds = np.cumsum(np.bincount(inverse.ravel()))[:-1]
        for idx in np.split(order, bounds):
            n = idx.size
            n_test = 0 if n < 2 or test_fraction == 0 else min(n - 1, max(1, round(n * test_fraction)))
            n_val = 0 if n - n_test < 2 or val_fraction == 0 else min(n - n_test - 1, max(1, round(n * val_fraction)))
            perm = rng.permutation(idx)
            tests.append(perm[:n_test])
            vals.append(perm[n_test : n_test + n_val])
    test = np.sort(np.concatenate(tests)).astype(np.int64)
    val = np.sort(np.concatenate(vals)).astype(np.int64)
    is_train = np.ones(y.size, dtype=bool)
    is_train[test] = False
    is_train[val] = False
    return np.flatnonzero(is_train).astype(np.int64), val, test


def split_hash(*index_arrays: np.ndarray) -> str:
    """Short SHA-256 of index arrays (which cells went where): equal hashes mean equal splits."""
    h = hashlib.sha256()
    for arr in index_arrays:
        a = np.ascontiguousarray(np.asarray(arr, dtype=np.int64))
        h.update(str(a.size).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def gene_stats(X: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return per-gene float64 sums, float64 sums of squares and int64 detection counts of sparse X."""
    m = sp.csr_matrix(X) if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
    if not m.has_canonical_format:
        m = m.copy()
        m.sum_duplicates()
    n_genes = m.shape[1]
    data = m.data.astype(np.float64)
    sums = np.bincount(m.indices, weights=data, minlength=n_genes)
    sumsq = np.bincount(m.indices, weights=data * data, minlength=n_genes)
    detected = np.bincount(m.indices[data > 0], minlength=n_genes).astype(np.int64)
    return sums, sumsq, detected


def select_variable_genes(
    genes: Sequence[str], sums: np.ndarray, sumsq: np.ndarray, detected: np.ndarray, n_cells: int, *, n_top: int
) -> list[str]:
    """Return the n_top most variable detected genes, in the original order of ``genes``."""
    if n_cells <= 0 or n_top <= 0:
        msg = f"n_cells and n_top must be positive, got n_cells={n_cells}, n_top={n_top}"
        raise ValueError(msg)
    s, q, d = np.asarray(sums, dtype=np.float64), np.asarray(sumsq, dtype=np.float64), np.asarray(detected)
    if not len(genes) == s.size == q.size == d.size:
        msg = f"genes/sums/sumsq/detected lengths differ: {len(genes)}, {s.size}, {q.size}, {d.size}"
        raise ValueError(msg)
    variance = q / n_cells - (s / n_cells) ** 2
    candidates = np.flatnonzero(d > 0)
    if n_top < candidates.size:
        order = np.argsort(-variance[candidates], kind="stable")
        candidates = np.sort(candidates[order[:n_top]])
    return [str(genes[int(i)]) for i in candidates]


@dataclass(frozen=True, eq=False)
class SiteCells:
    """Everything about a site's cells but their expression matrix: labels, input kind, split, library sizes.

    ``select`` holds the positions of the site's rows in its source matrix (a file may hold several
    sites), ``rows`` the positions of the kept (labelled) cells among those; ``gene_nnz`` counts
    each input gene's non-zeros over the site's rows (it sizes the prepared matrix before it is built).
    """

    labels: np.ndarray
    classes: tuple[str, ...]
    genes: tuple[str, ...]
    kind: InputKind
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    n_dropped_cells: int
    rows: np.ndarray
    select: np.ndarray
    library: np.ndarray | None
    gene_nnz: np.ndarray

    @property
    def source_rows(self) -> np.ndarray:
        """Positions of the kept cells in the source matrix."""
        return self.select[self.rows]


@dataclass(frozen=True, eq=False)
class PreparedSite:
    """A site's labelled, log-normalised, gene-aligned data with its train/test split."""

    X: sp.csr_matrix
    labels: np.ndarray
    classes: tuple[str, ...]
    genes: tuple[str, ...]
    kind: InputKind
    train_idx: np.ndarray
    test_idx: np.ndarray
    n_dropped_cells: int
    coverage: float
    rows: np.ndarray | None = None  # positions (not ids) of the kept cells in the input AnnData
    val_idx: np.ndarray = field(
        default_factory=lambda: np.empty(0, np.int64)
    )  # validation cells: for choices, never for training
    # Count input only: each kept cell's total counts over ALL its genes (X = log1p(counts / library * TARGET_SUM)),
    # so the plan genes' counts are expm1(X) * library / TARGET_SUM; None for log-normalised input.
    library: np.ndarray | None = None


def _check_expect_value(expect: str) -> None:
    if expect not in ("auto", "counts", "lognorm"):
        msg = f"unknown expect {expect!r}; expected 'auto', 'counts' or 'lognorm'"
        raise ConfigError(msg)


def _check_expect(kind: InputKind, expect: Expect) -> None:
    """Refuse input whose detected kind contradicts what the caller promised."""
    if expect == "counts" and kind == "lognorm":
        msg = (
            "this file holds log-normalised values but counts were promised (expect='counts'); provide "
            "raw counts (e.g. adata.layers['counts'] or adata.raw) or set expect to 'lognorm' or 'auto'"
        )
        raise SiteDataError(msg)
    if expect == "lognorm" and kind == "counts":
        msg = (
            "this file holds raw counts but log-normalised values were promised (expect='lognorm'); set "
            "expect to 'counts' or 'auto', or provide sc.pp.normalize_total + sc.pp.log1p values"
        )
        raise SiteDataError(msg)


@dataclass(frozen=True)
class SplitConfig:
    """How a site's cells are labelled and split (the site data contract's knobs)."""

    label_key: str
    expect: Expect = "auto"
    min_cells_per_class: int = 2
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    seed: int = 0


def read_cells(
    rows: Rows | None,
    var_names: Sequence[str] | pd.Index,
    obs: pd.DataFrame,
    config: SplitConfig,
    *,
    select: np.ndarray | None = None,
    chunk_rows: int | None = None,
) -> SiteCells:
    """Check a site's rows against the data contract (one pass over their values) and label and split its cells.

    ``select``: sorted positions of the site's rows in ``rows`` / ``obs`` (default: all of them).
    """
    _check_expect_value(config.expect)
    if rows is None:
        msg = (
            "adata.X is empty (None); expected the expression matrix in X; "
            "set adata.X = adata.layers['counts'] before writing"
        )
        raise SiteDataError(msg)
    check_genes(var_names)
    select = np.arange(rows.shape[0], dtype=np.int64) if select is None else np.asarray(select, dtype=np.int64)
    scan = scan_values(rows, select, chunk_rows=chunk_rows)
    kind = scan.kind()
    _check_expect(kind, config.expect)
    categories = _labels(
        obs.iloc[select] if select.size != len(obs) else obs, config.label_key, config.min_cells_per_class
    )
    keep = np.flatnonzero(categories.codes >= 0)
    totals = np.concatenate(scan.totals) if scan.totals else np.zeros(0)
    labels = np.asarray(categories.codes[keep], dtype=np.int64)
    train_idx, val_idx, test_idx = stratified_split(
        labels, test_fraction=config.test_fraction, val_fraction=config.val_fraction, seed=config.seed
    )
    return SiteCells(
        labels=labels,
        classes=tuple(str(c) for c in categories.categories),
        genes=tuple(str(g) for g in var_names),
        kind=kind,
        train_idx=train_idx,
        val_idx=val_idx,
        test_idx=test_idx,
        n_dropped_cells=int(select.size - keep.size),
        rows=keep,
        select=select,
        library=totals[keep] if kind == "counts" else None,
        gene_nnz=scan.gene_nnz,
    )


def normalised_blocks(
    rows: Rows, cells: SiteCells, *, subset: np.ndarray | None = None, chunk_rows: int | None = None
) -> Iterator[tuple[slice, sp.csr_matrix]]:
    """The kept cells' (or the sorted ``subset`` of them) log-normalised rows over all input genes, a block at a time:
    (which of those cells, their rows)."""
    source = cells.source_rows if subset is None else cells.source_rows[subset]
    for where, block in rows.blocks(source, chunk_rows):
        yield where, normalize(block, cells.kind)


Allocate = Callable[[str, int, type], np.ndarray]  # (array name, length, dtype) -> a writable 1-D array


def build_matrix(
    rows: Rows,
    cells: SiteCells,
    vocabulary: Sequence[str] | None = None,
    *,
    min_coverage: float = 0.5,
    parts: Sequence[np.ndarray] | None = None,
    allocate: Allocate | None = None,
    chunk_rows: int | None = None,
) -> tuple[sp.csr_matrix, float]:
    """The kept cells' log-normalised float32 CSR on ``vocabulary``'s columns (default: the input genes), and the
    coverage.

    ``parts``: sorted positions among the kept cells, written one part after the other (e.g. the
    training, validation and test cells, so that each is a contiguous block of rows: ``shared.fitting.row_view``);
    default: every kept cell in order. Built in place: the arrays are sized from the first pass's
    non-zero counts, so peak memory is the result plus one block (8 bytes per stored value with
    int32 indices, 12 with int64 beyond 2^31 values). ``allocate`` gives the ``data``, ``indices`` and
    ``indptr`` arrays (default: in memory; a site passes memory-mapped files, so the matrix is written to
    its cache without being held in memory).
    """
    genes = list(cells.genes)
    if vocabulary is None:
        colmap, coverage, n_out = np.arange(len(genes), dtype=np.int64), 1.0, len(genes)
    else:
        colmap, coverage = column_map(genes, vocabulary, min_coverage=min_coverage)
        n_out = len(vocabulary)
    parts = [np.arange(cells.rows.size)] if parts is None else [np.asarray(p, dtype=np.int64) for p in parts]
    n_rows = int(sum(p.size for p in parts))
    capacity = int(cells.gene_nnz[colmap >= 0].sum())
    index_dtype = np.int32 if capacity < np.iinfo(np.int32).max else np.int64
    allocate = allocate or (lambda _name, n, dtype: np.empty(n, dtype=dtype))
    data, indices, indptr = (
        allocate("data", capacity, np.float32),
        allocate("indices", capacity, index_dtype),
        allocate("indptr", n_rows + 1, index_dtype),
    )
    indptr[0] = 0
    filled, offset = 0, 0
    for part in parts:
        for where, block in normalised_blocks(rows, cells, subset=part, chunk_rows=chunk_rows):
            piece = remap_columns(block, colmap, n_out)
            end = filled + piece.nnz
            if end > capacity:  # the first pass counted every non-zero of these rows: a changed file between passes
                msg = "the site's file changed while it was being read; run again on a file that is not being written"
                raise SiteDataError(msg)
            data[filled:end] = piece.data
            indices[filled:end] = piece.indices
            indptr[offset + where.start + 1 : offset + where.stop + 1] = filled + piece.indptr[1:]
            filled = end
        offset += part.size
    if filled < capacity and isinstance(data, np.memmap):
        data, indices = data[:filled], indices[:filled]  # the file keeps its length; readers take indptr[-1] values
    elif filled < capacity:
        data.resize(filled, refcheck=False)
        indices.resize(filled, refcheck=False)
    X = sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_out), copy=False)
    X.has_sorted_indices = True
    logger.debug(
        "prepared %d cells x %d genes: %d stored values (%.1f MB)",
        n_rows,
        n_out,
        filled,
        (data.nbytes + indices.nbytes + indptr.nbytes) / 1e6,
    )
    return X, coverage


def prepared(cells: SiteCells, X: sp.csr_matrix, coverage: float, genes: Sequence[str]) -> PreparedSite:
    """A PreparedSite from a site's cells and their prepared matrix on ``genes``."""
    site = PreparedSite(
        X=X,
        labels=cells.labels,
        classes=cells.classes,
        genes=tuple(str(g) for g in genes),
        kind=cells.kind,
        train_idx=cells.train_idx,
        test_idx=cells.test_idx,
        n_dropped_cells=cells.n_dropped_cells,
        coverage=coverage,
        rows=cells.rows,
        val_idx=cells.val_idx,
        library=cells.library,
    )
    logger.info(
        "site prepared: %d cells x %d genes, %d classes, input %s, %d cells dropped, coverage %.3f",
        X.shape[0],
        X.shape[1],
        len(site.classes),
        site.kind,
        site.n_dropped_cells,
        coverage,
    )
    return site


def prepare_site(
    adata: anndata.AnnData,
    *,
    label_key: str,
    expect: Expect = "auto",
    vocabulary: Sequence[str] | None = None,
    min_coverage: float = 0.5,
    min_cells_per_class: int = 2,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
    chunk_rows: int | None = None,
) -> PreparedSite:
    """Check, normalise, label, align and split one site's AnnData (in memory; ``prepare_file`` streams a file)."""
    config = SplitConfig(label_key, expect, min_cells_per_class, test_fraction, val_fraction, seed)
    _check_expect_value(config.expect)
    rows = None if adata.X is None else memory_rows(adata.X)
    cells = read_cells(rows, adata.var_names, adata.obs, config, chunk_rows=chunk_rows)
    assert rows is not None  # read_cells refused a missing X
    X, coverage = build_matrix(rows, cells, vocabulary, min_coverage=min_coverage, chunk_rows=chunk_rows)
    return prepared(cells, X, coverage, cells.genes if vocabulary is None else vocabulary)


def prepare_file(
    path: str | Path,
    config: SplitConfig,
    *,
    vocabulary: Sequence[str] | None = None,
    min_coverage: float = 0.5,
    select: np.ndarray | None = None,
    chunk_rows: int | None = None,
) -> PreparedSite:
    """``prepare_site`` on a file without reading it whole: two passes over its rows, ``chunk_rows`` cells at a time."""
    with open_site_file(path) as f:
        cells = read_cells(f.X, f.var_names, f.obs, config, select=select, chunk_rows=chunk_rows)
        assert f.X is not None  # read_cells refused a missing X
        X, coverage = build_matrix(f.X, cells, vocabulary, min_coverage=min_coverage, chunk_rows=chunk_rows)
    return prepared(cells, X, coverage, cells.genes if vocabulary is None else vocabulary)


@dataclass(frozen=True)
class CheckReport:
    """Result of checking one .h5ad file against the site data contract."""

    path: str
    n_cells: int
    n_genes: int
    kind: InputKind
    classes: dict[str, int]
    n_dropped_cells: int
    coverage: float
    warnings: tuple[str, ...]
    n_vocabulary: int | None = None

    def summary(self) -> str:
        """Return a short multi-line human summary of the check."""
        what = (
            f"raw counts (normalised to {_TARGET_TEXT} + log1p)"
            if self.kind == "counts"
            else "log-normalised values (used as is)"
        )
        lines = [
            f"{Path(self.path).name}: {self.n_cells} cells x {self.n_genes} genes, {what}",
            f"  {len(self.classes)} classes: " + ", ".join(f"{c} ({n})" for c, n in self.classes.items()),
            f"  cells dropped (missing label or class too small): {self.n_dropped_cells}",
        ]
        lines.append(
            "  gene coverage: no plan vocabulary given"
            if self.n_vocabulary is None
            else f"  gene coverage: {self.coverage:.1%} of the plan's {self.n_vocabulary} genes"
        )
        lines.append(f"  warnings: {len(self.warnings)}")
        lines.extend(f"    - {w}" for w in self.warnings)
        lines.append("  OK: the file meets the site data contract")
        return "\n".join(lines)


def check_file(
    path: str | Path,
    *,
    label_key: str,
    expect: Expect = "auto",
    vocabulary: Sequence[str] | None = None,
    min_cells_per_class: int = 2,
    min_coverage: float = 0.5,
    chunk_rows: int | None = None,
) -> CheckReport:
    """Check one .h5ad file against the contract in one streamed pass (memory: one block of ``chunk_rows`` cells)."""
    config = SplitConfig(label_key, expect, min_cells_per_class)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_site_file(path) as f:
            cells = read_cells(f.X, f.var_names, f.obs, config, chunk_rows=chunk_rows)
            n_cells, n_genes = len(f.obs), len(f.var_names)
        coverage = 1.0 if vocabulary is None else column_map(cells.genes, vocabulary, min_coverage=min_coverage)[1]
    texts = tuple(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)))
    per_class = np.bincount(cells.labels, minlength=len(cells.classes))
    return CheckReport(
        path=str(path),
        n_cells=n_cells,
        n_genes=n_genes,
        kind=cells.kind,
        classes={c: int(n) for c, n in zip(cells.classes, per_class, strict=True)},
        n_dropped_cells=cells.n_dropped_cells,
        coverage=coverage,
        warnings=texts,
        n_vocabulary=None if vocabulary is None else len(vocabulary),
    )
