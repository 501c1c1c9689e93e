"""Row blocks of a site's cells x genes matrix, from memory or straight from its .h5ad file.

A hospital site of a million cells does not fit in memory whole, so every pass over a site's
expression values (``shared.data``: contract checks, normalisation, gene statistics, the plan-gene
matrix) reads it as blocks of rows. What each storage costs:

- CSR (anndata's default for sparse X): blocks are read from the file's ``data`` / ``indices``
  datasets; only the row pointer (8 bytes per cell) stays in memory.
- dense X: blocks of rows are read from the dataset.
- CSC: a column-major matrix cannot be read by rows; it is loaded whole and converted to CSR once
  (about twice the matrix in memory, as ``anndata.read_h5ad`` would need). Write sites as CSR
  (``adata.X = scipy.sparse.csr_matrix(adata.X)``) to stream them.
- gzip / lzf compressed datasets are decompressed a block at a time by h5py.

anndata's own backed mode reads rows too, but it gives no access to the row pointer or to blocks
of raw CSR arrays without building a scipy matrix per row slice, and it keeps the file open in a
global handle: this reader is a few h5py calls over anndata's documented on-disk format.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from shared.errors import SiteDataError

logger = logging.getLogger(__name__)

CHUNK_ROWS = (
    8192  # cells per block: at ~2 000 stored values per cell about 130 MB of raw block with its normalised copy
)


@dataclass(frozen=True)
class Rows:
    """Row access to a cells x genes matrix: ``read(start, stop)`` gives rows [start, stop) as CSR in the
    stored dtype."""

    shape: tuple[int, int]
    dtype: np.dtype
    read: Callable[[int, int], sp.csr_matrix]
    stored: np.ndarray  # values stored per row (sparse: non-zeros; dense: the row length)

    def blocks(self, rows: np.ndarray, size: int | None = None) -> Iterator[tuple[slice, sp.csr_matrix]]:
        """For sorted row positions ``rows``: (which entries of ``rows`` the block holds, their CSR rows), ``size`` rows
        of the matrix at a time (default ``CHUNK_ROWS``)."""
        size = CHUNK_ROWS if size is None else size
        if size < 1:
            msg = f"chunk size must be >= 1 row, got {size}"
            raise ValueError(msg)
        rows = np.asarray(rows, dtype=np.int64)
        lo = 0
        for start in range(0, self.shape[0], size):
            hi = int(np.searchsorted(rows, start + size, side="left"))
            if hi == lo:
                continue
            first, last = int(rows[lo]), int(rows[hi - 1]) + 1
            block = self.read(first, last)
            wanted = rows[lo:hi] - first
            if wanted.size != last - first:
                block = block[wanted]
            yield slice(lo, hi), block
            lo = hi


def _canonical(block: sp.csr_matrix) -> sp.csr_matrix:
    if not block.has_canonical_format:
        block.sum_duplicates()
    return block


def memory_rows(X: Any) -> Rows:
    """Rows of an in-memory numpy array or scipy sparse matrix (other sparse formats are converted to CSR once)."""
    if sp.issparse(X):
        m = X if X.format == "csr" else sp.csr_matrix(X)
        return Rows(
            m.shape,
            m.dtype,
            lambda a, b: _canonical(sp.csr_matrix(m[a:b], copy=True)),
            np.diff(m.indptr).astype(np.int64),
        )
    if isinstance(X, np.ndarray) and X.ndim == 2:
        return Rows(X.shape, X.dtype, lambda a, b: sp.csr_matrix(X[a:b]), np.full(X.shape[0], X.shape[1], np.int64))
    if isinstance(X, np.ndarray):
        msg = f"X has {X.ndim} dimensions; expected a 2-D cells x genes matrix; store it as adata.X"
        raise SiteDataError(msg)
    msg = (
        f"X has unsupported type {type(X).__name__}; expected a numpy array or scipy sparse "
        "matrix; load the file into memory (anndata.read_h5ad(path) without backed=...)"
    )
    raise SiteDataError(msg)


def _attr(obj: h5py.HLObject, key: str) -> str:
    value = obj.attrs.get(key, "")
    return value.decode() if isinstance(value, bytes) else str(value)


def _csr_rows(group: h5py.Group, shape: tuple[int, int]) -> Rows:
    indptr = group["indptr"][...].astype(np.int64)
    data, indices = group["data"], group["indices"]

    def read(a: int, b: int) -> sp.csr_matrix:
        lo, hi = int(indptr[a]), int(indptr[b])
        block = sp.csr_matrix((data[lo:hi], indices[lo:hi], indptr[a : b + 1] - lo), shape=(b - a, shape[1]))
        return _canonical(block)

    return Rows(shape, data.dtype, read, np.diff(indptr))


def h5_rows(elem: h5py.Group | h5py.Dataset) -> Rows:
    """Rows of an anndata matrix element in an open file (CSR and dense are streamed, CSC is loaded whole)."""
    if isinstance(elem, h5py.Dataset):
        if elem.ndim != 2:
            msg = f"X has {elem.ndim} dimensions; expected a 2-D cells x genes matrix; store it as adata.X"
            raise SiteDataError(msg)
        n, m = (int(v) for v in elem.shape)
        return Rows((n, m), elem.dtype, lambda a, b: sp.csr_matrix(elem[a:b]), np.full(n, m, np.int64))
    kind = _attr(elem, "encoding-type")
    shape = tuple(int(v) for v in elem.attrs.get("shape", (0, 0)))
    if kind == "csr_matrix" and len(shape) == 2:
        return _csr_rows(elem, (shape[0], shape[1]))
    if kind == "csc_matrix":
        logger.warning(
            "X is stored column-major (CSC): it is loaded whole to read it by cells (about 2x its size in memory); "
            "store it as CSR to stream it"
        )
        return memory_rows(sp.csr_matrix(anndata.io.read_elem(elem)))
    msg = (
        f"X is stored as {kind or 'an unknown element'!r}, not a matrix anndata writes "
        "(csr_matrix, csc_matrix or a dense array); rewrite the file with anndata (adata.write_h5ad)"
    )
    raise SiteDataError(msg)


@dataclass(frozen=True)
class SiteFile:
    """An open .h5ad file: its cell annotations, gene names and the rows of X (read on demand)."""

    obs: pd.DataFrame
    var_names: pd.Index
    X: Rows | None


def not_anndata(p: Path, exc: Exception) -> SiteDataError:
    logger.debug("reading %s failed with %s", p, type(exc).__name__)
    what = (
        "is HDF5 but not an AnnData .h5ad (a 10x .h5? convert it with scanpy.read_10x_h5)"
        if h5py.is_hdf5(p)
        else "is not an HDF5/h5ad file"
    )
    msg = (
        f"cannot read {p} as AnnData ({type(exc).__name__}): it {what}; expected an AnnData .h5ad "
        "written by anndata/scanpy, e.g. adata.write_h5ad('site.h5ad')"
    )
    return SiteDataError(msg)


def check_path(path: str | Path) -> Path:
    """The path of a site's .h5ad file, refusing missing paths and directories."""
    p = Path(path).expanduser()
    if not p.exists():
        msg = f"no such file: {p}; pass the path of your .h5ad"
        raise SiteDataError(msg)
    if p.is_dir():
        msg = f"{p} is a directory, not a file; pass the path of the .h5ad file itself"
        raise SiteDataError(msg)
    return p


@contextmanager
def open_site_file(path: str | Path) -> Iterator[SiteFile]:
    """Open a site's .h5ad for streaming: obs and var names are read now, X block by block while the file is open."""
    p = check_path(path)
    try:
        fh = h5py.File(p, "r")
    except OSError as exc:
        raise not_anndata(p, exc) from None
    with fh:
        try:
            obs = anndata.io.read_elem(fh["obs"])
            var_names = anndata.io.read_elem(fh["var"]).index
        except Exception as exc:  # noqa: BLE001 - any reader failure means "not a readable .h5ad"
            raise not_anndata(p, exc) from None
        X = h5_rows(fh["X"]) if "X" in fh else None
        if X is not None and X.shape != (len(obs), len(var_names)):
            msg = (
                f"X has shape {X.shape} but the file annotates {len(obs)} cells and {len(var_names)} genes; "
                "the file is damaged: rewrite it with anndata (adata.write_h5ad)"
            )
            raise SiteDataError(msg)
        yield SiteFile(obs, pd.Index(var_names), X)
