"""Streamed site preparation: a file read a few cells at a time gives exactly what reading it whole gives."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import shared.stream
from client.site import SiteSource, load_profile, load_site, profile_of_site
from shared.data import SplitConfig, check_file, prepare_file, prepare_site, read_h5ad
from shared.errors import SiteDataError
from shared.plan import plan_vocabulary, profile_of
from shared.protocol import SiteSpec

CHUNK = 64  # the bundled file (1 556 cells) takes 25 blocks


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared.stream, "CHUNK_ROWS", CHUNK)


def _same_site(a, b) -> None:
    assert a.X.shape == b.X.shape and a.X.dtype == b.X.dtype == np.float32
    assert (
        np.array_equal(a.X.indptr, b.X.indptr)
        and np.array_equal(a.X.indices, b.X.indices)
        and np.array_equal(a.X.data, b.X.data)
    )
    for key in ("labels", "train_idx", "val_idx", "test_idx", "classes", "genes"):
        assert np.array_equal(np.asarray(getattr(a, key)), np.asarray(getattr(b, key))), key
    assert np.array_equal(a.library, b.library)


def _vocabulary(adata: ad.AnnData) -> list[str]:
    """A plan-like vocabulary: every third gene, reversed, plus a gene the file lacks."""
    return [*list(adata.var_names[::3])[::-1], "NOT_IN_THE_FILE"]


@pytest.mark.parametrize("with_plan", [False, True])
def test_streamed_file_equals_in_memory_preparation(example_path: Path, with_plan: bool) -> None:
    adata = read_h5ad(example_path)
    vocab = _vocabulary(adata) if with_plan else None
    whole = prepare_site(adata, label_key="cell_type", vocabulary=vocab, seed=3)
    streamed = prepare_file(example_path, SplitConfig("cell_type", seed=3), vocabulary=vocab, chunk_rows=CHUNK)
    _same_site(whole, streamed)
    assert streamed.kind == whole.kind == "counts" and streamed.coverage == pytest.approx(whole.coverage)
    assert whole.X.shape[1] == (len(vocab) if vocab else adata.n_vars) and whole.X.has_canonical_format
    # the streamed rows are the in-memory normalisation of the same cells
    assert np.allclose(streamed.X[:5].sum(axis=1), whole.X[:5].sum(axis=1))


@pytest.mark.parametrize("layout", ["dense", "csc", "csr-gzip", "csr-plain"])
def test_every_storage_layout_streams_to_the_same_site(example_path: Path, tmp_path: Path, layout: str) -> None:
    adata = read_h5ad(example_path)
    if layout == "dense":
        adata.X = adata.X.toarray()
    elif layout == "csc":
        adata.X = sp.csc_matrix(adata.X)
    path = tmp_path / f"{layout}.h5ad"
    adata.write_h5ad(path, compression="gzip" if layout != "csr-plain" else None)
    vocab = _vocabulary(adata)
    reference = prepare_site(read_h5ad(example_path), label_key="cell_type", vocabulary=vocab)
    _same_site(reference, prepare_file(path, SplitConfig("cell_type"), vocabulary=vocab, chunk_rows=CHUNK))


def test_a_selection_of_rows_streams_like_the_subset_in_memory(three_site_h5ad: Path) -> None:
    adata = read_h5ad(three_site_h5ad)
    select = np.flatnonzero(adata.obs["site"].astype(str).to_numpy() == sorted(set(adata.obs["site"].astype(str)))[1])
    whole = prepare_site(adata[select].copy(), label_key="cell_type")
    _same_site(whole, prepare_file(three_site_h5ad, SplitConfig("cell_type"), select=select, chunk_rows=7))


def test_streamed_profile_and_plan_equal_the_in_memory_ones(
    example_path: Path, tmp_path: Path, small_chunks: None
) -> None:
    spec = SiteSpec(label_key="cell_type")
    source = SiteSource(name="kang", path=example_path)
    streamed = load_profile(source, spec, cache=tmp_path)
    site = load_site(source, spec, None, cache=tmp_path)
    in_memory = profile_of_site(site, clip=False)
    assert np.allclose(streamed.sums, in_memory.sums, rtol=1e-12) and np.allclose(
        streamed.sumsq, in_memory.sumsq, rtol=1e-12
    )
    assert (
        np.array_equal(streamed.detected, in_memory.detected)
        and streamed.has_counts
        and streamed.clipped.shape == (0, len(site.genes))
    )
    train = site.train_idx
    reference = profile_of("kang", site.X[train], site.genes, [site.classes[j] for j in site.labels[train]])
    assert np.allclose(reference.sums, streamed.sums, rtol=1e-12) and int(reference.n_cells) == train.size
    from client.tasks import profile_site

    reply = profile_site(streamed)
    assert plan_vocabulary([reply], n_genes=200) == plan_vocabulary([reference], n_genes=200)
    assert load_profile(source, spec, cache=tmp_path).sums.tobytes() == streamed.sums.tobytes()  # from the cache


def test_streamed_dp_profile_sums_equal_the_in_memory_ones(
    example_path: Path, tmp_path: Path, small_chunks: None
) -> None:
    from shared.privacy.spec import DPSpec

    spec = SiteSpec(
        label_key="cell_type",
        dp=DPSpec(8.0, None, 1.0, "run", rounds=1, vae_steps=1, vae_batch=8, scdg_steps=1, scdg_batch=8),
    )
    source = SiteSource(name="kang", path=example_path)
    streamed = load_profile(source, spec, cache=tmp_path)
    in_memory = profile_of_site(load_site(source, spec, None, cache=tmp_path), clip=True)
    assert streamed.clipped.shape == (3, len(streamed.genes)) and np.allclose(
        streamed.clipped, in_memory.clipped, rtol=1e-10
    )


def test_check_streams_and_refuses_a_damaged_file(example_path: Path, tmp_path: Path) -> None:
    report = check_file(example_path, label_key="cell_type", chunk_rows=CHUNK)
    assert (
        report.n_cells == 1556
        and report.kind == "counts"
        and sum(report.classes.values()) + report.n_dropped_cells == 1556
    )
    import h5py

    broken = tmp_path / "broken.h5ad"
    broken.write_bytes(example_path.read_bytes())
    with h5py.File(broken, "r+") as f:
        f["X"].attrs["shape"] = np.array([10, 10])
    with pytest.raises(SiteDataError, match="X has shape"):
        check_file(broken, label_key="cell_type")


def test_the_cached_site_is_ordered_by_split_and_memory_mapped(
    example_path: Path, tmp_path: Path, small_chunks: None
) -> None:
    from shared.fitting import row_view

    adata = read_h5ad(example_path)
    vocab = _vocabulary(adata)
    spec = SiteSpec(label_key="cell_type")
    site = load_site(SiteSource(name="kang", path=example_path), spec, vocab, cache=tmp_path)
    whole = prepare_site(
        adata,
        label_key="cell_type",
        vocabulary=vocab,
        seed=spec.split_seed,
        test_fraction=spec.test_fraction,
        val_fraction=spec.val_fraction,
    )
    n_train, n_val = whole.train_idx.size, whole.val_idx.size
    assert np.array_equal(site.train_idx, np.arange(n_train)) and np.array_equal(
        site.val_idx, n_train + np.arange(n_val)
    )
    for mine, theirs in (
        (site.train_idx, whole.train_idx),
        (site.val_idx, whole.val_idx),
        (site.test_idx, whole.test_idx),
    ):
        view = row_view(site.X, mine)
        assert np.shares_memory(view.data, site.X.data) and (view != whole.X[theirs]).nnz == 0
        assert np.array_equal(site.labels[mine], whole.labels[theirs]) and np.array_equal(
            site.library[mine], whole.library[theirs]
        )
    scattered = np.array([0, 5, 6])
    assert (
        not np.shares_memory(row_view(site.X, scattered).data, site.X.data)
        and (row_view(site.X, scattered) != site.X[scattered]).nnz == 0
    )
