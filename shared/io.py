"""Atomic file writes: a reader never sees half a file, a crash never leaves one behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # anndata is heavy to import; only write_h5ad's callers need it
    import anndata as ad


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> Path:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (sorted keys, NaN kept as in Python's json)."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_h5ad(path: str | Path, adata: ad.AnnData) -> Path:
    """Write an AnnData atomically (gzip-compressed)."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, compression="gzip")
    return Path(path)


def write_with(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call writer(tmp) and move the result into place atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)
