"""Gaussian mechanisms on clipped per-cell statistics, with noise drawn from a site secret.

Each cell contributes a vector whose L2 norm is clipped to 1 (``clip_rows``), so adding or removing
one cell moves a sum by at most 1 in L2: Gaussian noise of standard deviation ``sigma`` on the sum is
the Gaussian mechanism with noise multiplier ``sigma``. Statistics with several parts (sums, sums of
squares, detection counts) stack their parts, each scaled by a public bound and clipped, so one
release covers them all.

The noise comes from a generator seeded by a secret that never leaves the site (a random file in its
private cache) and the release's key (run, site, what). The coordinator cannot predict or
subtract it; the same release asked twice in one run gets the same noise, so a retried or resumed
message releases nothing new.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from shared.errors import SiteDataError

SECRET_FILE = "dp-secret"
SECRET_BYTES = 32

# Public clipping bounds (they must not depend on the data). A log-normalised cell (1e4 target sum) with ~1,000
# detected genes has ||x|| ~ 50, ||x^2|| ~ 130, sqrt(detected) ~ 32; larger cells are scaled down.
GENE_NORM = 60.0
GENE_SQ_NORM = 200.0
DETECTED_NORM = 45.0
PROFILE_BOUNDS = (GENE_NORM, GENE_SQ_NORM, DETECTED_NORM)  # the profile's parts: values, squares, detection
# The class means' release clips each cell's difference to the plan's center (all sites' mean cell), which is shorter
# than the cell (kang: median 35 vs 54, cbmc 42 vs 46 over the plan genes): half GENE_NORM, chosen on validation
# cells (benchmarks/results/dp_curve.md).
CENTERED_NORM = 30.0


def class_sums_bound(center: Sequence[float] | np.ndarray | None) -> float:
    """The L2 bound on one cell's contribution to the released class sums (their noise sd is the noise multiplier x
    this): its difference to the plan's center when the plan has one, else the cell itself."""
    return CENTERED_NORM if center is not None and len(center) else GENE_NORM


LOG_LIBRARY_MAX = 15.0  # log total counts: above e^15 = 3.3 million counts per cell nothing is expected


def site_secret(cache: Path) -> bytes:
    """The site's noise secret (created once, mode 0600, in its private cache folder)."""
    path = cache / SECRET_FILE
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{SECRET_FILE}.")  # mode 0600, a name of its own per process
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(SECRET_BYTES))
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)  # exclusive: of two processes creating it at once, one secret wins for both
        finally:
            os.unlink(tmp)  # no second copy of the secret left behind
    data = path.read_bytes()
    if len(data) != SECRET_BYTES:
        msg = (
            f"the DP noise secret {path} is damaged ({len(data)} bytes, expected {SECRET_BYTES}); "
            "delete it and start a new run"
        )
        raise SiteDataError(msg)
    return data


def _seed(secret: bytes, key: Any) -> int:
    return int.from_bytes(hashlib.sha256(secret + json.dumps(key, sort_keys=True).encode()).digest()[:8], "little")


def noise_rng(secret: bytes, key: Any) -> np.random.Generator:
    """A generator only the site can reproduce: seeded by its secret and the release's key."""
    return np.random.default_rng(_seed(secret, key))


def torch_generator(secret: bytes, key: Any):  # noqa: ANN201 - torch.Generator
    """The torch counterpart of ``noise_rng`` (DP-SGD noise and Poisson sampling)."""
    import torch

    return torch.Generator().manual_seed(_seed(secret, key) & (2**63 - 1))


def clip_rows(V: np.ndarray, bound: float = 1.0) -> np.ndarray:
    """Rows scaled down to L2 norm <= bound (rows within it are unchanged)."""
    V = np.asarray(V, dtype=np.float64)
    norms = np.linalg.norm(V, axis=1, keepdims=True)
    return V * np.minimum(1.0, bound / np.maximum(norms, 1e-12))


def clipped_profile_sums(X: sp.csr_matrix) -> np.ndarray:
    """(3, G): over the rows of ``X``, sums of each cell's values, squares and detection vectors, each clipped to its
    public norm bound and scaled by 1 / (bound * sqrt 3), so that one cell's three vectors together have norm <= 1 (the
    DP profile's release)."""
    X = sp.csr_matrix(X, dtype=np.float64)
    sq = X.multiply(X).tocsr()
    det = X.copy()
    det.data = (det.data > 0).astype(np.float64)
    out = np.zeros((3, X.shape[1]))
    for i, (part, bound) in enumerate(zip((X, sq, det), PROFILE_BOUNDS, strict=True)):
        norms = np.sqrt(np.asarray(part.multiply(part).sum(1)).ravel())
        scale = np.minimum(1.0, bound / np.maximum(norms, 1e-12)) / (bound * math.sqrt(3.0))
        out[i] = np.asarray(part.T @ scale).ravel()
    return out


def noisy_class_sums(
    V: np.ndarray, labels: np.ndarray, n_classes: int, sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """Per class, the sum of the rows of V (each clipped to norm 1) plus N(0, sigma^2) on every entry:
    (n_classes, m)."""
    V = clip_rows(V)
    out = np.zeros((n_classes, V.shape[1]))
    np.add.at(out, labels, V)
    return out + rng.normal(0.0, sigma, out.shape)


def noisy_counts(labels: np.ndarray, n_classes: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Cells per class plus N(0, sigma^2) (sensitivity 1: a cell is in one class)."""
    return np.bincount(labels, minlength=n_classes).astype(np.float64) + rng.normal(0.0, sigma, n_classes)


def name_threshold(sigma: float, delta: float) -> float:
    """A label name is released only when its noised count exceeds this: a class of one cell passes with probability <=
    delta."""
    from scipy.stats import norm

    return 1.0 + sigma * float(norm.isf(delta))
