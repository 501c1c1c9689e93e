"""Test cells are only ever scored: rewriting the expression of every test cell (same kind of data, same labels) leaves
the plan, every model weight and every code bit-identical, in the federation and in the benchmark pipeline; only the
scores move."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from server.bench.benchmark import BenchmarkConfig, SplitConfig, prepare_seed
from server.cli.simulation import InProcessGrid, run_in_process
from shared.checkpoint import load_model
from shared.data import prepare_site, read_h5ad
from shared.distill import DistillConfig, distill_codes
from shared.fitting import TrainConfig
from shared.pretrain import PretrainConfig
from shared.protocol import MSG_DISTILL, MSG_EVALUATE, MSG_PRETRAIN, DistillReply, EvaluateReply, PretrainReply
from shared.sites import site_of_cells

SEED = 3
RUN = {
    "sim-site-key": "batch",
    "label-key": "cell_type",
    "n-genes": 200,
    "num-pretrain-rounds": 2,
    "vae-local-steps": 20,
    "scdg-local-steps": 10,
    "vae-batch-size": 64,
    "scdg-batch-size": 64,
    "cells-per-class": 3,
    "num-distill-rounds": 2,
    "distill-iterations": 5,
    "finetune-steps": 5,
    "mlp-min-steps": 20,
    "mlp-max-steps": 20,
    "report": False,
    "seed": SEED,
}


def _test_rows(adata: ad.AnnData, sites: np.ndarray) -> np.ndarray:
    """Positions in the file of every site's test cells, found the way a site splits (prepare_site with the run's
    seed)."""
    rows = []
    for name in np.unique(sites):
        where = np.flatnonzero(sites == name)
        site = prepare_site(adata[where].copy(), label_key="cell_type", seed=SEED, test_fraction=0.2, val_fraction=0.1)
        assert site.rows is not None
        rows.append(where[site.rows[site.test_idx]])
    return np.sort(np.concatenate(rows))


def _rewrite(adata: ad.AnnData, rows: np.ndarray, path: Path) -> Path:
    """The file with each listed cell's counts shuffled over the genes (integer counts, same library size, same
    label)."""
    X = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    rng = np.random.default_rng(0)
    for r in rows:
        X[r] = rng.permutation(X[r])
    out = adata.copy()
    out.X = sp.csr_matrix(X)
    out.write_h5ad(path)
    return path


def _replies(grid: InProcessGrid, kind: str) -> list:
    return [ex.reply.content for ex in grid.log if ex.message_type == kind]


def _state(path: Path, kind: str) -> dict[str, torch.Tensor]:
    return load_model(path, kind).state_dict()


@pytest.fixture(scope="module")
def two_runs(
    tmp_path_factory: pytest.TempPathFactory, example_path: Path
) -> tuple[tuple[InProcessGrid, Path], tuple[InProcessGrid, Path]]:
    adata = read_h5ad(example_path)
    tmp = tmp_path_factory.mktemp("isolation")
    rows = _test_rows(adata, adata.obs["batch"].astype(str).to_numpy())
    assert 250 < rows.size < 400  # about 20 % of 1556 cells
    changed = _rewrite(adata, rows, tmp / "changed.h5ad")
    runs = []
    for name, data in (("original", example_path), ("changed", changed)):
        cfg = {**RUN, "sim-data-path": str(data), "out-dir": str(tmp), "run-id": name}
        grid = run_in_process(
            cfg, num_nodes=4, node_configs=[{"cache-dir": str(tmp / f"cache-{name}")}] * 4, record=True
        )
        runs.append((grid, tmp / name))
    return runs[0], runs[1]


def test_federation_plan_weights_and_codes_ignore_test_cells(two_runs) -> None:
    (grid_a, dir_a), (grid_b, dir_b) = two_runs
    assert json.loads((dir_a / "plan.json").read_text()) == json.loads((dir_b / "plan.json").read_text())
    for kind in ("vae", "scdg"):
        a, b = _state(dir_a / f"{kind}.pt", kind), _state(dir_b / f"{kind}.pt", kind)
        assert all(torch.equal(a[k], b[k]) for k in a), kind
    pre_a, pre_b = _replies(grid_a, MSG_PRETRAIN), _replies(grid_b, MSG_PRETRAIN)
    assert len(pre_a) == len(pre_b) > 0
    for ra, rb in zip(pre_a, pre_b, strict=True):
        wa, wb = PretrainReply.from_record(ra), PretrainReply.from_record(rb)
        if wa.weights is not None:
            assert all(np.array_equal(wa.weights[k], wb.weights[k]) for k in wa.weights)
        else:
            assert np.array_equal(wa.latent_sum, wb.latent_sum) and np.array_equal(wa.latent_sumsq, wb.latent_sumsq)
    codes_a = [DistillReply.from_record(r) for r in _replies(grid_a, MSG_DISTILL)]
    codes_b = [DistillReply.from_record(r) for r in _replies(grid_b, MSG_DISTILL)]
    assert len(codes_a) == 8
    assert all(
        np.array_equal(a.codes, b.codes) and np.array_equal(a.labels, b.labels)
        for a, b in zip(codes_a, codes_b, strict=True)
    )


def test_federation_scores_do_see_the_changed_test_cells(two_runs) -> None:
    """The other half of the proof: the test cells did change, and they are what the sites score."""
    (grid_a, _), (grid_b, _) = two_runs
    eval_a = [EvaluateReply.from_record(r) for r in _replies(grid_a, MSG_EVALUATE)]
    eval_b = [EvaluateReply.from_record(r) for r in _replies(grid_b, MSG_EVALUATE)]
    assert [e.n_test for e in eval_a] == [e.n_test for e in eval_b]
    assert any(a.scores["mlp"].accuracy != b.scores["mlp"].accuracy for a, b in zip(eval_a, eval_b, strict=True))
    # validation cells were not changed, and nothing trained differs: their scores are identical
    assert all(
        a.val_scores["mlp"].accuracy == b.val_scores["mlp"].accuracy for a, b in zip(eval_a, eval_b, strict=True)
    )


def test_benchmark_pipeline_ignores_test_cells_on_a_dirichlet_split(example_path: Path, tmp_path: Path) -> None:
    """The benchmark's own path (Dirichlet site split, pooled pretraining, distillation) with the same test."""
    adata = read_h5ad(example_path)
    tiny = PretrainConfig(vae=TrainConfig(steps=30, batch_size=64), scdg=TrainConfig(steps=20, batch_size=64))
    cfg = BenchmarkConfig(pretrain=tiny, split=SplitConfig(site_key="absent", n_sites=3, n_genes=200))
    sites = site_of_cells(adata, label_key="cell_type", site_key="absent", n_sites=3, seed=SEED)
    changed = read_h5ad(_rewrite(adata, _test_rows(adata, sites), tmp_path / "changed.h5ad"))
    a, b = prepare_seed(adata, cfg, SEED, pretrain_models=True), prepare_seed(changed, cfg, SEED, pretrain_models=True)
    assert a.split_hash == b.split_hash and a.fed.genes == b.fed.genes
    assert a.pre is not None and b.pre is not None
    sa, sb = a.pre.vae.state_dict(), b.pre.vae.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for i in range(len(a.fed.sites)):
        ca = distill_codes(a.pre.vae, a.pre.scdg, *a.fed.train(i), DistillConfig(k=3, iterations=5, seed=i))
        cb = distill_codes(b.pre.vae, b.pre.scdg, *b.fed.train(i), DistillConfig(k=3, iterations=5, seed=i))
        assert np.array_equal(ca.codes, cb.codes) and np.array_equal(ca.seed_rows, cb.seed_rows)
    assert (a.fed.test(0)[0] != b.fed.test(0)[0]).nnz > 0  # the test cells themselves did change
