"""Site data contract on real datasets and on small exact cases."""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from fake_sites import make_site_adata

from shared.data import (
    TARGET_SUM,
    PreparedSite,
    align_genes,
    check_file,
    check_genes,
    check_labels,
    detect_kind,
    gene_stats,
    normalize,
    prepare_site,
    read_h5ad,
    select_variable_genes,
    stratified_split,
)
from shared.errors import ConfigError, SiteDataError

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
TEAM_DATA = REPO.parent / "shared" / "data"
KANG = REPO / "shared" / "example_data" / "kang_pbmc_muscat.h5ad"
TEAM_FILES = sorted(TEAM_DATA.glob("*.h5ad")) if TEAM_DATA.is_dir() else []
NO_TEAM_DATA = "../shared/data not present (team datasets are not part of a user clone)"


@functools.cache
def _load(path: Path) -> anndata.AnnData:
    """Read an .h5ad once per session (tests must not modify the result)."""
    return anndata.read_h5ad(path)


def _expected_kind(x_kind: str) -> str:
    """Map the free-text uns['x_kind'] of the team datasets to 'counts' or 'lognorm'."""
    text = x_kind.lower()
    if text.startswith("raw") and "counts" in text:
        return "counts"
    if "log-normalised" in text or "log-normalized" in text:
        return "lognorm"
    pytest.fail(f"unmapped uns['x_kind'] value: {x_kind!r}; extend _expected_kind")


def _team_file(name: str) -> Path:
    """Return a team dataset path or skip when the folder is absent."""
    if not TEAM_DATA.is_dir():
        pytest.skip(NO_TEAM_DATA)
    return TEAM_DATA / name


# ---------------------------------------------------------------- detection on real data


@pytest.mark.parametrize("path", TEAM_FILES or [None], ids=lambda p: p.name if p else "absent")
def test_detect_kind_matches_x_kind_on_every_team_file(path: Path | None) -> None:
    """Detection agrees with the documented uns['x_kind'] of every team dataset."""
    if path is None:
        pytest.skip(NO_TEAM_DATA)
    adata = _load(path)
    expected = _expected_kind(str(adata.uns["x_kind"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the Lawlor fractional-count warning
        assert detect_kind(adata.X) == expected


def test_team_data_has_both_kinds() -> None:
    """The parametrised detection test above covers both counts and log-normalised files."""
    if not TEAM_FILES:
        pytest.skip(NO_TEAM_DATA)
    kinds = {_expected_kind(str(_load(p).uns["x_kind"])) for p in TEAM_FILES}
    assert kinds == {"counts", "lognorm"}


def test_pancreas_fractional_counts_are_counts_with_warning() -> None:
    """Pancreas (and its Lawlor site alone, 44 % fractional estimates) is counts, with a warning."""
    adata = _load(_team_file("pancreas_3study_cepo.h5ad"))
    with pytest.warns(UserWarning, match="fractional estimated counts"):
        assert detect_kind(adata.X) == "counts"
    lawlor = adata[adata.obs["batch"] == "Lawlor2017_FluidigmC1"]
    with pytest.warns(UserWarning, match="fractional"):
        assert detect_kind(lawlor.X) == "counts"


def test_every_team_file_prepares_by_batch() -> None:
    """Every team file, split by batch where it has one, passes prepare_site with sane output."""
    if not TEAM_FILES:
        pytest.skip(NO_TEAM_DATA)
    for path in TEAM_FILES:
        adata = _load(path)
        groups = adata.obs["batch"].cat.categories if "batch" in adata.obs else [None]
        for batch in groups:
            part = adata if batch is None else adata[adata.obs["batch"] == batch]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                site = prepare_site(part, label_key="cell_type")
            assert site.X.shape[0] == part.n_obs - site.n_dropped_cells, (path.name, batch)
            assert site.X.dtype == np.float32 and sp.isspmatrix_csr(site.X)
            assert site.X.data.min() >= 0 and site.X.data.max() < 20


def test_kang_bundled_file_is_counts() -> None:
    """The bundled example holds raw counts."""
    assert detect_kind(_load(KANG).X) == "counts"


def test_lognormalised_kang_is_lognorm_and_cpm_is_refused() -> None:
    """Scanpy-normalised kang is read as lognorm; un-logged CPM of it is refused."""
    counts = _load(KANG).X
    assert detect_kind(normalize(counts, "counts")) == "lognorm"
    cpm = counts.multiply(1e6 / np.asarray(counts.sum(axis=1))).tocsr().astype(np.float32)
    with pytest.raises(SiteDataError, match="CPM/TPM"):
        detect_kind(cpm)
    logcpm = cpm.copy()
    logcpm.data = np.log1p(logcpm.data)
    with pytest.warns(UserWarning, match="another scale factor"):
        assert detect_kind(logcpm) == "lognorm"


def test_detect_kind_integer_dtype_and_dense() -> None:
    """Integer dtypes and dense arrays are accepted."""
    x = np.array([[0, 3, 1], [2, 0, 5]], dtype=np.int32)
    assert detect_kind(x) == "counts"
    assert detect_kind(sp.csc_matrix(x.astype(np.float64))) == "counts"
    assert detect_kind(np.log1p(x.astype(np.float32) * 10.3)) == "lognorm"


# ---------------------------------------------------------------- normalisation


def _split_entries(x: sp.csr_matrix) -> sp.csr_matrix:
    """Return a non-canonical CSR equal to x: every stored entry split into two duplicate halves."""
    nnz_per_row = np.diff(x.indptr)
    indices = np.repeat(x.indices, 2)
    data = np.repeat(x.data / 2, 2)
    out = sp.csr_matrix((data, indices, np.r_[0, np.cumsum(2 * nnz_per_row)]), shape=x.shape)
    assert not out.has_canonical_format
    return out


def test_normalize_counts_gives_target_library_size_and_stays_sparse() -> None:
    """Counts become log1p(TARGET_SUM-normalised) CSR float32; zero cells stay zero; input untouched."""
    counts = sp.csr_matrix(_load(KANG).X[:300])
    counts = sp.vstack([counts, sp.csr_matrix((1, counts.shape[1]), dtype=np.float32)], format="csr")
    before = counts.copy()
    out = normalize(counts, "counts")
    assert sp.isspmatrix_csr(out) and out.dtype == np.float32
    lib = np.asarray(np.expm1(out.astype(np.float64)).sum(axis=1)).ravel()
    np.testing.assert_allclose(lib[:-1], TARGET_SUM, rtol=1e-4)
    assert lib[-1] == 0
    assert out.nnz == counts.nnz
    assert (counts != before).nnz == 0
    row = counts[5].toarray().ravel()
    expected = np.log1p(row / row.sum() * TARGET_SUM)
    np.testing.assert_allclose(out[5].toarray().ravel(), expected, rtol=1e-5)


def test_normalize_sums_duplicate_entries_first() -> None:
    """A non-canonical CSR (duplicate entries) normalises like its canonical form."""
    counts = sp.csr_matrix(make_site_adata(20, 15, seed=6).X)
    expected = normalize(counts, "counts").toarray()
    np.testing.assert_allclose(normalize(_split_entries(counts), "counts").toarray(), expected, rtol=1e-6)


def test_normalize_lognorm_is_unchanged_csr_float32() -> None:
    """Log-normalised input is returned as CSR float32 with equal values (a copy)."""
    x = sp.random(20, 10, density=0.3, format="csc", dtype=np.float64, random_state=0)
    out = normalize(x, "lognorm")
    assert sp.isspmatrix_csr(out) and out.dtype == np.float32
    np.testing.assert_allclose(out.toarray(), x.toarray(), rtol=1e-6)
    dense = normalize(x.toarray(), "lognorm")
    assert sp.isspmatrix_csr(dense)


# ---------------------------------------------------------------- genes


def test_align_genes_partial_overlap() -> None:
    """Present genes keep their values in vocabulary order; missing ones are zero columns."""
    x = sp.csr_matrix(np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 6.0]], dtype=np.float32))
    vocab = ["c", "z", "y", "a", "w"]
    out, coverage = align_genes(x, ["a", "b", "c"], vocab, min_coverage=0.4)
    assert sp.isspmatrix_csr(out) and out.dtype == np.float32
    np.testing.assert_array_equal(out.toarray(), [[3, 0, 0, 1, 0], [6, 0, 0, 4, 0]])
    assert coverage == pytest.approx(0.4)


def test_align_genes_refuses_no_overlap_and_low_coverage() -> None:
    """Zero overlap and coverage under the threshold are SiteDataErrors with the fraction."""
    x = sp.csr_matrix(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(SiteDataError, match="no overlap"):
        align_genes(x, ["a", "b", "c"], ["ENSG1", "ENSG2"])
    with pytest.raises(SiteDataError, match=r"25\.0%.*50%"):
        align_genes(x, ["a", "b", "c"], ["a", "x", "y", "z"], min_coverage=0.5)
    out, coverage = align_genes(x, ["a", "b", "c"], ["a", "x", "y", "z"], min_coverage=0.25)
    assert coverage == 0.25 and out.shape == (2, 4)


def test_check_genes_accepts_unique_names() -> None:
    """Unique gene names pass."""
    check_genes(pd.Index(["a", "b"]))


def test_gene_stats_equals_dense_computation() -> None:
    """Sparse per-gene sums, sums of squares and detection counts equal the dense ones."""
    rng = np.random.default_rng(1)
    dense = rng.random((30, 12)) * (rng.random((30, 12)) < 0.4)
    with_zeros = sp.csr_matrix(dense)
    with_zeros.data[::3] = 0.0  # explicit stored zeros are not detections
    dense = with_zeros.toarray()
    for x in (with_zeros, sp.csc_matrix(with_zeros), dense):
        sums, sumsq, detected = gene_stats(x)
        np.testing.assert_allclose(sums, dense.sum(axis=0))
        np.testing.assert_allclose(sumsq, (dense**2).sum(axis=0))
        np.testing.assert_array_equal(detected, (dense > 0).sum(axis=0))
        assert sums.dtype == np.float64 and sumsq.dtype == np.float64 and detected.dtype == np.int64
    _, sumsq, detected = gene_stats(_split_entries(sp.csr_matrix(dense)))
    np.testing.assert_allclose(sumsq, (dense**2).sum(axis=0))
    np.testing.assert_array_equal(detected, (dense > 0).sum(axis=0))


def test_select_variable_genes_order_and_count() -> None:
    """Top genes by variance, undetected excluded, returned in the original order."""
    genes = ["g0", "g1", "g2", "g3", "g4"]
    n = 10
    variances = np.array([0.5, 3.0, 9.0, 1.0, 2.0])
    means = np.ones(5)
    sums = means * n
    sumsq = (variances + means**2) * n
    detected = np.array([5, 5, 0, 5, 5])  # g2 is never detected
    assert select_variable_genes(genes, sums, sumsq, detected, n, n_top=2) == ["g1", "g4"]
    assert select_variable_genes(genes, sums, sumsq, detected, n, n_top=3) == ["g1", "g3", "g4"]
    assert select_variable_genes(genes, sums, sumsq, detected, n, n_top=10) == ["g0", "g1", "g3", "g4"]


def test_select_variable_genes_on_data_matches_dense_variance() -> None:
    """On synthetic data the selection equals the dense top-variance genes."""
    x = normalize(make_site_adata(100, 40, seed=3).X, "counts")
    genes = [f"g{j}" for j in range(40)]
    chosen = select_variable_genes(genes, *gene_stats(x), x.shape[0], n_top=7)
    var = x.toarray().astype(np.float64).var(axis=0)
    assert chosen == [genes[j] for j in sorted(np.argsort(-var, kind="stable")[:7])]


# ---------------------------------------------------------------- split


def test_stratified_split_is_stratified_disjoint_complete_and_seeded() -> None:
    """Per class round(n*f) test cells (>= 1 if n >= 2, 0 if n == 1) and round(n*v) validation cells (>= 1 if 2 cells
    are left); disjoint; deterministic."""
    labels = np.array(["a"] * 50 + ["b"] * 7 + ["c"] * 2 + ["d"] * 1 + ["e"] * 3)
    train, val, test = stratified_split(labels, test_fraction=0.2, val_fraction=0.1, seed=0)
    assert train.dtype == val.dtype == test.dtype == np.int64
    assert all(np.all(np.diff(part) > 0) for part in (train, val, test))
    assert np.intersect1d(train, test).size == np.intersect1d(train, val).size == np.intersect1d(val, test).size == 0
    np.testing.assert_array_equal(np.sort(np.r_[train, val, test]), np.arange(labels.size))
    count = lambda part: {c: int(np.sum(labels[part] == c)) for c in "abcde"}  # noqa: E731
    assert count(test) == {"a": 10, "b": 1, "c": 1, "d": 0, "e": 1}
    assert count(val) == {"a": 5, "b": 1, "c": 0, "d": 0, "e": 1}
    assert min(count(train).values()) >= 1  # every class keeps a training cell
    again = stratified_split(labels, test_fraction=0.2, val_fraction=0.1, seed=0)
    for a, b in zip((train, val, test), again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = stratified_split(labels, test_fraction=0.2, val_fraction=0.1, seed=1)
    assert not np.array_equal(test, other[2]) and not np.array_equal(val, other[1])


def test_test_cells_do_not_depend_on_the_validation_fraction() -> None:
    labels = np.repeat(np.arange(4), 25)
    _, val0, test0 = stratified_split(labels, test_fraction=0.2, val_fraction=0.0, seed=3)
    _, val1, test1 = stratified_split(labels, test_fraction=0.2, val_fraction=0.1, seed=3)
    np.testing.assert_array_equal(test0, test1)
    assert val0.size == 0 and np.bincount(labels[val1]).tolist() == [2, 2, 2, 2]  # round(2.5) = 2
    with pytest.raises(ConfigError, match="sum below 1"):
        stratified_split(labels, test_fraction=0.6, val_fraction=0.5)


def test_stratified_split_integer_labels() -> None:
    """Integer class ids work the same way."""
    labels = np.repeat(np.arange(4), 25)
    train, val, test = stratified_split(labels, test_fraction=0.2, seed=5)
    assert np.bincount(labels[test]).tolist() == [5, 5, 5, 5]
    assert train.size == 80 and val.size == 0


# ---------------------------------------------------------------- labels


def test_check_labels_missing_and_small_classes() -> None:
    """Missing labels and too-small classes become NaN with warnings; categories sorted strings."""
    adata = make_site_adata(30, 10, 2, seed=1)
    labels = adata.obs["cell_type"].astype(str).to_numpy(dtype=object)
    labels[:3] = [np.nan, "", "NA"]
    labels[3] = "rare"
    adata.obs["cell_type"] = labels
    with pytest.warns(UserWarning) as record:
        cat = check_labels(adata, label_key="cell_type")
    texts = " | ".join(str(w.message) for w in record)
    assert "3 of 30 cells have no label" in texts and "rare (1)" in texts
    assert list(cat.categories) == ["type_0", "type_1"]
    assert int(np.sum(cat.codes < 0)) == 4


def test_check_labels_integer_valued_floats_become_ids() -> None:
    """Float cluster ids such as 1.0 become the class name '1'."""
    adata = make_site_adata(30, 10, 3, seed=1)
    adata.obs["cluster"] = np.arange(30) % 3 + 1.0
    cat = check_labels(adata, label_key="cluster")
    assert list(cat.categories) == ["1", "2", "3"]


def test_check_labels_repeated_floats_are_continuous() -> None:
    """A float column with > 50 distinct non-integer values is refused even when values repeat."""
    adata = make_site_adata(600, 10, 3, seed=1)
    adata.obs["score"] = np.repeat(np.linspace(0.5, 99.5, 100), 6)
    with pytest.raises(SiteDataError, match="looks continuous"):
        check_labels(adata, label_key="score")


# ---------------------------------------------------------------- prepare_site / check_file


def test_prepare_site_on_kang() -> None:
    """The bundled file prepares into a complete, normalised, stratified site."""
    adata = _load(KANG)
    site = prepare_site(adata, label_key="cell_type", seed=0)
    assert isinstance(site, PreparedSite)
    assert site.kind == "counts" and site.coverage == 1.0 and site.n_dropped_cells == 0
    assert site.X.shape == (1556, 1267) and sp.isspmatrix_csr(site.X) and site.X.dtype == np.float32
    assert site.classes == tuple(sorted(adata.obs["cell_type"].astype(str).unique()))
    assert site.genes == tuple(adata.var_names)
    assert site.labels.dtype == np.int64
    names = np.asarray(site.classes)[site.labels]
    np.testing.assert_array_equal(names, adata.obs["cell_type"].astype(str).to_numpy())
    assert site.train_idx.size + site.val_idx.size + site.test_idx.size == 1556
    assert site.test_idx.size == pytest.approx(0.2 * 1556, abs=len(site.classes))
    assert site.val_idx.size == pytest.approx(0.1 * 1556, abs=len(site.classes))
    lib = np.asarray(np.expm1(site.X.astype(np.float64)).sum(axis=1)).ravel()
    np.testing.assert_allclose(lib, TARGET_SUM, rtol=1e-4)


def test_prepare_site_with_vocabulary_and_lognorm_input() -> None:
    """Vocabulary alignment and lognorm input flow through prepare_site."""
    adata = make_site_adata(60, 20, 3, kind="lognorm", seed=2)
    vocab = [f"g{j}" for j in range(15)] + ["x1", "x2", "x3", "x4", "x5"]
    site = prepare_site(adata, label_key="cell_type", vocabulary=vocab, expect="lognorm")
    assert site.kind == "lognorm" and site.genes == tuple(vocab) and site.coverage == 0.75
    assert site.X.shape == (60, 20) and site.X[:, 15:].nnz == 0
    np.testing.assert_allclose(site.X[:, :15].toarray(), adata.X[:, :15].toarray())


def test_single_class_site_warns_but_works() -> None:
    """A sorted population (one class) is valid and warned about."""
    adata = make_site_adata(40, 20, 1, seed=4)
    with pytest.warns(UserWarning, match="only one class"):
        site = prepare_site(adata, label_key="cell_type")
    assert site.classes == ("type_0",) and set(site.labels.tolist()) == {0}
    assert site.test_idx.size == 8


def test_make_site_adata_is_deterministic() -> None:
    """Same seed gives identical data; another seed differs."""
    a, b, c = make_site_adata(seed=7), make_site_adata(seed=7), make_site_adata(seed=8)
    assert (a.X != b.X).nnz == 0 and (a.X != c.X).nnz > 0
    assert a.obs["cell_type"].equals(b.obs["cell_type"])
    assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.float32 and a.obs["batch"].nunique() == 2


def test_check_file_summary_on_kang(tmp_path: Path) -> None:
    """check_file reports shape, kind, classes and coverage in a short human summary."""
    report = check_file(KANG, label_key="cell_type", vocabulary=[*list(_load(KANG).var_names[:1000]), "NOPE"])
    assert report.n_cells == 1556 and report.n_genes == 1267 and report.kind == "counts"
    assert sum(report.classes.values()) == 1556 and len(report.classes) == 5
    text = report.summary()
    assert text.startswith("kang_pbmc_muscat.h5ad: 1556 cells x 1267 genes, raw counts")
    assert "1e4" in text and "CD14+ Monocytes (400)" in text and "99.9%" in text
    assert report.warnings == ()


def test_check_file_captures_warnings(tmp_path: Path) -> None:
    """Warnings raised while preparing a file land in the report."""
    adata = make_site_adata(40, 20, 2, seed=5)
    labels = adata.obs["cell_type"].astype(object).to_numpy()
    labels[:4] = None
    adata.obs["cell_type"] = pd.Categorical(labels)
    path = tmp_path / "site.h5ad"
    adata.write_h5ad(path)
    report = check_file(path, label_key="cell_type")
    assert report.n_dropped_cells == 4 and report.kind == "counts"
    assert any("4 of 40 cells have no label" in w for w in report.warnings)
    assert "warnings: 1" in report.summary()
    assert read_h5ad(path).n_obs == 40
