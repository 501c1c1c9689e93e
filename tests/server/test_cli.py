"""End-to-end `scdd` commands on real data: check, distill, benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from server.cli import main


def test_check_accepts_the_example_file(example_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(example_path), "--label-key", "cell_type"]) == 0
    out = capsys.readouterr().out
    assert "1556 cells" in out and "counts" in out and "OK" in out


def test_check_refuses_with_one_line_and_no_traceback(tmp_path: Path, example_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(example_path), "--label-key", "no_such_column"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("scdd check: error:") and "no_such_column" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    bogus = tmp_path / "x.h5ad"
    bogus.write_text("hello")
    assert main(["check", str(bogus)]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_distill_writes_a_scanpy_ready_synthetic_file(tmp_path: Path, example_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth.h5ad"
    rc = main(["distill", str(example_path), "--k", "3", "--iterations", "20", "--pretrain-steps", "200,200", "--n-genes", "400", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "codes: 1200 bytes" in printed  # 3 codes x 5 classes x 19 dims (from 400 genes) x 4 bytes + 15 int32 labels
    assert "MLP held-out accuracy" in printed
    synth = ad.read_h5ad(out)
    assert synth.shape == (15, 400)
    assert set(synth.obs.columns) >= {"cell_type", "site", "synthetic"}
    assert synth.obs["cell_type"].value_counts().eq(3).all()
    assert np.isfinite(synth.X.toarray()).all()
    assert "vae_hash" in synth.uns["fedscdd"]["provenance_json"]


def test_benchmark_on_a_team_dataset_scdd_beats_random_at_k1(tmp_path: Path, team_data: Path) -> None:
    rc = main([
        "benchmark", str(team_data / "kang_pbmc_muscat.h5ad"), "--methods", "scdd,random,centralized", "--k", "1",
        "--seeds", "2", "--evaluators", "mlp", "--iterations", "100", "--pretrain-steps", "500,600", "--n-genes", "500",
        "--out", str(tmp_path),
    ])
    assert rc == 0
    result = json.loads((tmp_path / "kang_pbmc_muscat" / "results.json").read_text())
    assert result["dataset"] == "kang_pbmc_muscat"
    rows = {(r["method"], r["k"]): r for r in result["rows"]}
    assert set(rows) == {("scdd", 1), ("random", 1), ("centralized", None)}
    for r in result["rows"]:
        assert set(r) >= {"method", "k", "evaluator", "accuracy_mean", "accuracy_std", "macro_f1_mean", "upload_bytes_per_site", "distill_seconds"}
    # measured 0.878 vs 0.831 (2 seeds, each with its own split and pretraining, at this small pretraining budget)
    assert rows[("scdd", 1)]["accuracy_mean"] > rows[("random", 1)]["accuracy_mean"] + 0.03
    assert len(set(result["split_hashes"])) == 2 and all(len(r["accuracy_per_seed"]) == 2 for r in result["rows"])
    assert rows[("random", 1)]["seed_mia"] >= 0.95 and rows[("random", 1)]["dcr_share"] >= 0.95  # uploaded real cells: the audit sees them
    assert rows[("scdd", 1)]["seed_mia"] < rows[("random", 1)]["seed_mia"]
    assert "seed_mia" not in rows[("centralized", None)]
    assert rows[("scdd", 1)]["upload_bytes_per_site"] < rows[("random", 1)]["upload_bytes_per_site"] / 5
    assert (tmp_path / "kang_pbmc_muscat" / "results.md").read_text().startswith("# kang_pbmc_muscat")


def test_benchmark_merge_reruns_one_method_and_keeps_the_others(tmp_path: Path, example_path: Path) -> None:
    common = ["benchmark", str(example_path), "--k", "2", "--seeds", "1", "--evaluators", "mlp,knn", "--pretrain-steps", "20,20",
              "--n-genes", "200", "--out", str(tmp_path)]
    assert main([*common, "--methods", "random,gaussian"]) == 0
    path = tmp_path / "kang_pbmc_muscat" / "results.json"
    before = {(r["method"], r["evaluator"]): r for r in json.loads(path.read_text())["rows"]}
    assert main([*common, "--methods", "gaussian", "--merge"]) == 0
    after = json.loads(path.read_text())
    rows = {(r["method"], r["evaluator"]): r for r in after["rows"]}
    assert set(rows) == set(before)  # nothing lost, nothing duplicated
    assert rows[("random", "mlp")] == before[("random", "mlp")]  # kept as it was
    assert after["merged"]["rerun_methods"] == ["gaussian"] and after["merged"]["kept_methods"] == ["random"]
    assert [r["method"] for r in after["rows"]] == ["random", "random", "gaussian", "gaussian"]  # the benchmark's method order
    assert "merged into the earlier results" in (tmp_path / "kang_pbmc_muscat" / "results.md").read_text()
    assert main([*common, "--methods", "gaussian"]) == 0  # without --merge the file holds this run only
    assert {r["method"] for r in json.loads(path.read_text())["rows"]} == {"gaussian"}
    assert main([*common, "--seeds", "2", "--methods", "random", "--merge"]) == 2  # seed 1 is another split: nothing to merge into
    assert {r["method"] for r in json.loads(path.read_text())["rows"]} == {"gaussian"}
