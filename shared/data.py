"""Site data contract: read, check, normalise, align and split one site's AnnData.

Error and log text never holds expression values or cell ids (it may reach the coordinator).
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from shared.errors import ConfigError, SiteDataError

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
    """Read a site's .h5ad file, refusing missing paths, directories and non-AnnData files."""
    p = Path(path).expanduser()
    if not p.exists():
        msg = f"no such file: {p}; pass the path of your .h5ad"
        raise SiteDataError(msg)
    if p.is_dir():
        msg = f"{p} is a directory, not a file; pass the path of the .h5ad file itself"
        raise SiteDataError(msg)
    try:
        adata = anndata.read_h5ad(p)
    except Exception as exc:  # any reader failure means "not a readable .h5ad"
        logger.debug("reading %s failed with %s", p, type(exc).__name__)
        what = ("is HDF5 but not an AnnData .h5ad (a 10x .h5? convert it with scanpy.read_10x_h5)"
                if h5py.is_hdf5(p) else "is not an HDF5/h5ad file")
        msg = (f"cannot read {p} as AnnData ({type(exc).__name__}): it {what}; expected an AnnData .h5ad "
               "written by anndata/scanpy, e.g. adata.write_h5ad('site.h5ad')")
        raise SiteDataError(msg) from None
    return adata


def _stored_values(X: Any) -> np.ndarray:
    """Return the stored values of X after checking its type, dtype and shape."""
    if sp.issparse(X):
        data = X.data if X.format in ("csr", "csc", "coo") else sp.csr_matrix(X).data
    elif isinstance(X, np.ndarray):
        data = np.asarray(X).ravel()
    else:
        msg = (f"X has unsupported type {type(X).__name__}; expected a numpy array or scipy sparse "
               "matrix; load the file into memory (anndata.read_h5ad(path) without backed=...)")
        raise SiteDataError(msg)
    if X.ndim != 2:
        msg = f"X has {X.ndim} dimensions; expected a 2-D cells x genes matrix; store it as adata.X"
        raise SiteDataError(msg)
    n_cells, n_genes = X.shape
    if n_cells == 0 or n_genes == 0:
        msg = (f"X is empty ({n_cells} cells x {n_genes} genes); expected at least one cell and one "
               "gene; check that filtering/subsetting did not remove everything before adata.write_h5ad")
        raise SiteDataError(msg)
    if X.dtype.kind not in "iuf":
        msg = (f"X has non-numeric dtype {X.dtype.name}; expected integer or float expression values; "
               "convert it (adata.X = adata.X.astype('float32')) or " + _FIX_RAW)
        raise SiteDataError(msg)
    return data


def _check_values(data: np.ndarray) -> None:
    """Refuse NaN/Inf, negative values and all-zero data (messages carry counts only)."""
    if data.dtype.kind == "f":
        n_nan = int(np.count_nonzero(np.isnan(data)))
        n_inf = int(np.count_nonzero(np.isinf(data)))
        if n_nan or n_inf:
            msg = (f"X contains {n_nan + n_inf} NaN/Inf entries ({n_nan} NaN, {n_inf} Inf); expected "
                   "finite values; fix the step that produced them and " + _FIX_RAW)
            raise SiteDataError(msg)
    n_neg = int(np.count_nonzero(data < 0))
    if n_neg:
        msg = (f"X contains {n_neg} negative entries: it looks z-scored/scaled (e.g. sc.pp.scale); "
               + _FIX_RAW)
        raise SiteDataError(msg)
    if not np.any(data):
        msg = ("X is all zeros: no expression at all; expected raw counts or log-normalised values; "
               "check that the right layer was written, e.g. adata.X = adata.layers['counts']")
        raise SiteDataError(msg)


def detect_kind(X: Any) -> InputKind:
    """Decide whether X holds raw counts or log-normalised values, refusing anything else."""
    data = _stored_values(X)
    _check_values(data)
    if data.dtype.kind in "iu":
        return "counts"
    nonzero = data[data != 0]
    step = max(1, math.ceil(nonzero.size / SAMPLE_SIZE))
    sample = nonzero[::step].astype(np.float64)
    nonint = float(np.mean(sample != np.floor(sample)))
    vmax = float(nonzero.max())
    if nonint <= MAX_NONINT_COUNTS:
        return "counts"
    if vmax <= LOGNORM_MAX:
        if vmax > math.log1p(TARGET_SUM) + 0.5:
            _warn(f"X looks log-normalised but exceeds log1p({_TARGET_TEXT}): the site may have used "
                  f"another scale factor (e.g. logCPM); other sites use {_TARGET_TEXT} + log1p, so "
                  "provide raw counts if you can")
        return "lognorm"
    if nonint <= MAX_NONINT_FRACTIONAL:
        _warn(f"X holds large values of which {nonint:.0%} are non-integer; treating them as fractional "
              "estimated counts (e.g. RSEM/Salmon/C1 read estimates); provide integer counts if you have them")
        return "counts"
    msg = (f"X holds large non-integer values ({nonint:.0%} of stored values non-integer, max above "
           f"{LOGNORM_MAX:g}): looks like un-logged normalised data (CPM/TPM?); apply sc.pp.log1p or "
           "provide raw counts; if these are fractional counts, round them (X.data = np.rint(X.data))")
    raise SiteDataError(msg)


def _to_csr32(X: Any) -> sp.csr_matrix:
    """Return a canonical CSR float32 copy of X (sparse stays sparse)."""
    source = X if sp.issparse(X) else np.asarray(X)
    out = sp.csr_matrix(source, dtype=np.float32, copy=True)
    out.sum_duplicates()
    return out


def normalize(X: Any, kind: InputKind) -> sp.csr_matrix:
    """Return log1p(TARGET_SUM-normalised) counts, or log-normalised input as is, as CSR float32."""
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
            msg = (f"label column '{label_key}' looks continuous, not a class label ({n_distinct} distinct "
                   f"numeric values over {num.size} cells); expected cell-type names; pass --label-key "
                   "with the obs column that holds cell types")
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
    if min_cells_per_class < 1:
        msg = f"min_cells_per_class must be >= 1, got {min_cells_per_class}"
        raise ConfigError(msg)
    if label_key not in adata.obs.columns:
        cols = [str(c) for c in adata.obs.columns]
        shown = ", ".join(cols[:20]) + (f", ... ({len(cols)} in all)" if len(cols) > 20 else "")
        msg = (f"label column '{label_key}' not found in obs (available: {shown or 'none'}); "
               "pass --label-key with the obs column that holds cell types")
        raise SiteDataError(msg)
    labels = _label_strings(adata.obs[label_key], label_key)
    missing = pd.isna(labels)
    n_missing = int(missing.sum())
    if n_missing == labels.size:
        msg = (f"label column '{label_key}' has no labels: all {n_missing} cells are missing (NaN/empty); "
               "expected a cell-type name per cell; fill it or pass --label-key with the right column")
        raise SiteDataError(msg)
    if n_missing:
        _warn(f"{n_missing} of {labels.size} cells have no label in '{label_key}'; they are dropped")
    counts = pd.Series(labels[~missing]).value_counts().sort_index()
    kept = [str(c) for c in counts.index[counts >= min_cells_per_class]]
    small = counts[counts < min_cells_per_class]
    if not kept:
        msg = (f"too few cells per class: need >= {min_cells_per_class} cells in at least one class, but "
               f"every class has fewer ({len(counts)} classes); add labelled cells or merge rare classes")
        raise SiteDataError(msg)
    if len(small):
        _warn(f"dropping {len(small)} class(es) with fewer than {min_cells_per_class} cells: "
              f"{_class_list(small)}")
    if len(kept) == 1:
        _warn(f"only one class ('{kept[0]}') at this site: a sorted population is fine; it will "
              "contribute codes for that class only")
    return pd.Categorical(labels, categories=kept)


def check_genes(var_names: Sequence[str] | pd.Index) -> None:
    """Refuse an empty gene list, missing gene names and duplicated gene names."""
    names = pd.Index(var_names)
    if len(names) == 0:
        msg = ("the data has no genes (0 var_names); expected one column per gene named in var_names; "
               "write the full cells x genes matrix with adata.write_h5ad")
        raise SiteDataError(msg)
    n_na = int(names.isna().sum())
    if n_na:
        msg = f"{n_na} gene names are missing (NaN); expected a name per gene; fill adata.var_names"
        raise SiteDataError(msg)
    n_dup = int(names.duplicated().sum())
    if n_dup:
        msg = (f"{n_dup} duplicated gene names in var_names; expected unique gene identifiers; "
               "run adata.var_names_make_unique() (or sum the duplicates) before writing the file")
        raise SiteDataError(msg)


def align_genes(
    X: Any, genes: Sequence[str], vocabulary: Sequence[str], *, min_coverage: float = 0.5
) -> tuple[sp.csr_matrix, float]:
    """Return X with columns reordered to ``vocabulary`` (missing genes as zero columns) and the coverage."""
    genes = [str(g) for g in genes]
    vocab = [str(g) for g in vocabulary]
    check_genes(genes)
    if X.shape[1] != len(genes):
        msg = f"X has {X.shape[1]} columns but {len(genes)} gene names were given"
        raise ValueError(msg)
    if not vocab or len(set(vocab)) != len(vocab):
        msg = f"the plan's gene vocabulary must be non-empty and unique ({len(vocab)} names given)"
        raise ValueError(msg)
    position = {g: i for i, g in enumerate(genes)}
    src = np.array([position.get(g, -1) for g in vocab], dtype=np.int64)
    hit = src >= 0
    n_hit = int(hit.sum())
    coverage = n_hit / len(vocab)
    if n_hit == 0:
        msg = (f"no overlap with the plan's genes (0 of {len(vocab)}); check gene identifiers "
               "(symbols vs Ensembl IDs, version suffixes, case) and rename adata.var_names to match")
        raise SiteDataError(msg)
    if coverage < min_coverage:
        msg = (f"gene coverage too low: {n_hit} of the plan's {len(vocab)} genes ({coverage:.1%}) are "
               f"present, at least {min_coverage:.0%} required; check gene identifiers (symbols vs "
               "Ensembl IDs) or provide the unfiltered gene set")
        raise SiteDataError(msg)
    ones = np.ones(n_hit, dtype=np.float32)
    selector = sp.csr_matrix((ones, (src[hit], np.flatnonzero(hit))), shape=(len(genes), len(vocab)))
    out = sp.csr_matrix(_to_csr32(X) @ selector, dtype=np.float32)
    out.sort_indices()
    logger.debug("aligned %d genes to a vocabulary of %d (coverage %.3f)", len(genes), len(vocab), coverage)
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
        msg = f"test_fraction and val_fraction must be in [0, 1) with a sum below 1, got {test_fraction} and {val_fraction}"
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
            vals.append(perm[n_test:n_test + n_val])
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
    return [str(genes[i]) for i in candidates]


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
    val_idx: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # validation cells: for choices, never for training
    # Count input only: each kept cell's total counts over ALL its genes (X = log1p(counts / library * TARGET_SUM)), so the
    # plan genes' counts are expm1(X) * library / TARGET_SUM; None for log-normalised input.
    library: np.ndarray | None = None


def _select_rows(X: Any, keep: np.ndarray) -> Any:
    """Return the rows ``keep`` of X (X itself when every row is kept); sparse stays sparse."""
    if keep.size == X.shape[0]:
        return X
    return (sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X))[keep]


def _check_expect(kind: InputKind, expect: Expect) -> None:
    """Refuse input whose detected kind contradicts what the caller promised."""
    if expect == "counts" and kind == "lognorm":
        msg = ("this file holds log-normalised values but counts were promised (expect='counts'); provide "
               "raw counts (e.g. adata.layers['counts'] or adata.raw) or set expect to 'lognorm' or 'auto'")
        raise SiteDataError(msg)
    if expect == "lognorm" and kind == "counts":
        msg = ("this file holds raw counts but log-normalised values were promised (expect='lognorm'); set "
               "expect to 'counts' or 'auto', or provide sc.pp.normalize_total + sc.pp.log1p values")
        raise SiteDataError(msg)


def prepare_site(
    adata: anndata.AnnData, *, label_key: str, expect: Expect = "auto", vocabulary: Sequence[str] | None = None,
    min_coverage: float = 0.5, min_cells_per_class: int = 2, test_fraction: float = 0.2, val_fraction: float = 0.1, seed: int = 0,
) -> PreparedSite:
    """Check, normalise, label, align and split one site's AnnData."""
    if expect not in ("auto", "counts", "lognorm"):
        msg = f"unknown expect {expect!r}; expected 'auto', 'counts' or 'lognorm'"
        raise ConfigError(msg)
    if adata.X is None:
        msg = ("adata.X is empty (None); expected the expression matrix in X; "
               "set adata.X = adata.layers['counts'] before writing")
        raise SiteDataError(msg)
    check_genes(adata.var_names)
    kind = detect_kind(adata.X)
    _check_expect(kind, expect)
    categories = check_labels(adata, label_key=label_key, min_cells_per_class=min_cells_per_class)
    keep = np.flatnonzero(categories.codes >= 0)
    raw = _select_rows(adata.X, keep)
    library = np.asarray(raw.sum(axis=1), dtype=np.float64).ravel() if kind == "counts" else None
    X = normalize(raw, kind)
    genes = tuple(str(g) for g in adata.var_names)
    coverage = 1.0
    if vocabulary is not None:
        X, coverage = align_genes(X, genes, vocabulary, min_coverage=min_coverage)
        genes = tuple(str(g) for g in vocabulary)
    labels = np.asarray(categories.codes[keep], dtype=np.int64)
    train_idx, val_idx, test_idx = stratified_split(labels, test_fraction=test_fraction, val_fraction=val_fraction, seed=seed)
    site = PreparedSite(
        X=X, labels=labels, classes=tuple(str(c) for c in categories.categories), genes=genes, kind=kind,
        train_idx=train_idx, test_idx=test_idx, n_dropped_cells=int(adata.n_obs - keep.size), coverage=coverage,
        rows=keep, val_idx=val_idx, library=library,
    )
    logger.info("site prepared: %d cells x %d genes, %d classes, input %s, %d cells dropped, coverage %.3f",
                X.shape[0], X.shape[1], len(site.classes), kind, site.n_dropped_cells, coverage)
    return site


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
        what = (f"raw counts (normalised to {_TARGET_TEXT} + log1p)" if self.kind == "counts"
                else "log-normalised values (used as is)")
        lines = [
            f"{Path(self.path).name}: {self.n_cells} cells x {self.n_genes} genes, {what}",
            f"  {len(self.classes)} classes: " + ", ".join(f"{c} ({n})" for c, n in self.classes.items()),
            f"  cells dropped (missing label or class too small): {self.n_dropped_cells}",
        ]
        lines.append("  gene coverage: no plan vocabulary given" if self.n_vocabulary is None
                     else f"  gene coverage: {self.coverage:.1%} of the plan's {self.n_vocabulary} genes")
        lines.append(f"  warnings: {len(self.warnings)}")
        lines.extend(f"    - {w}" for w in self.warnings)
        lines.append("  OK: the file meets the site data contract")
        return "\n".join(lines)


def check_file(
    path: str | Path, *, label_key: str, expect: Expect = "auto", vocabulary: Sequence[str] | None = None,
    min_cells_per_class: int = 2, min_coverage: float = 0.5,
) -> CheckReport:
    """Read and prepare one .h5ad file, returning what was found and the warnings raised on the way."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adata = read_h5ad(path)
        site = prepare_site(
            adata, label_key=label_key, expect=expect, vocabulary=vocabulary,
            min_coverage=min_coverage, min_cells_per_class=min_cells_per_class,
        )
    texts = tuple(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)))
    per_class = np.bincount(site.labels, minlength=len(site.classes))
    return CheckReport(
        path=str(path), n_cells=int(adata.n_obs), n_genes=int(adata.n_vars), kind=site.kind,
        classes={c: int(n) for c, n in zip(site.classes, per_class)}, n_dropped_cells=site.n_dropped_cells,
        coverage=site.coverage, warnings=texts, n_vocabulary=None if vocabulary is None else len(vocabulary),
    )
