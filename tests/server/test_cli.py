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


def test_check_refuses_with_one_line_and_no_traceback(
    tmp_path: Path, example_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(example_path), "--label-key", "no_such_column"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("scdd check: error:") and "no_such_column" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    bogus = tmp_path / "x.h5ad"
    bogus.write_text("hello")
    assert main(["check", str(bogus)]) == 1
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.slow  # over 5 s: outside the fast tier
def test_distill_writes_a_scanpy_ready_synthetic_file(
    tmp_path: Path, example_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "synth.h5ad"
    rc = main(
        [
            "distill",
            str(example_path),
            "--k",
            "3",
            "--iterations",
            "20",
            "--pretrain-steps",
            "200,200",
            "--n-genes",
            "400",
            "--out",
            str(out),
        ]
    )
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
    counts = synth.layers[
        "counts"
    ].toarray()  # kang holds raw counts: sampled counts travel with the expected expression in X
    assert (
        (counts >= 0).all()
        and np.array_equal(counts, np.round(counts))
        and np.allclose(synth.layers["expected"].toarray(), synth.X.toarray())
    )


@pytest.mark.slow
def test_benchmark_runs_the_shipped_federation_and_scdd_beats_random_at_k1(tmp_path: Path, example_path: Path) -> None:
    """The bundled real data; scdd is the federation (FedAvg pretraining over the in-process grid), fedavg_mlp its
    classic rival."""
    rc = main(
        [
            "benchmark",
            str(example_path),
            "--methods",
            "scdd,random,fedavg_mlp,centralized",
            "--k",
            "1",
            "--seeds",
            "2",
            "--evaluators",
            "mlp",
            "--n-genes",
            "300",
            "--set",
            "num-pretrain-rounds=6",
            "--set",
            "vae-local-steps=60",
            "--set",
            "scdg-local-steps=40",
            "--set",
            "num-distill-rounds=1",
            "--set",  # the federation's own evaluate phase (the benchmark scores every method with its own rule)
            "mlp-min-steps=20",
            "--set",
            "mlp-max-steps=20",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    result = json.loads((tmp_path / "kang_pbmc_muscat" / "results.json").read_text())
    assert result["dataset"] == "kang_pbmc_muscat"
    rows = {(r["method"], r["k"]): r for r in result["rows"]}
    assert set(rows) == {("scdd", 1), ("random", 1), ("fedavg_mlp", None), ("centralized", None)}
    for r in result["rows"]:
        assert set(r) >= {
            "method",
            "k",
            "evaluator",
            "accuracy_mean",
            "accuracy_std",
            "macro_f1_mean",
            "upload_bytes_per_site",
            "distill_seconds",
            "pretraining_mode",
        }
    assert rows[("scdd", 1)]["pretraining_mode"] == "fedavg" and rows[("random", 1)]["pretraining_mode"] == "none"
    assert rows[("scdd", 1)]["rounds"] == 6 and rows[("fedavg_mlp", None)]["rounds"] == 6
    assert rows[("scdd", 1)]["pretrain_upload_bytes_per_site"] > 1e6  # model weights did travel: the federated path ran
    n_params = (300 * 256 + 256) + (256 * 256 + 256) + (256 * 5 + 5)  # the 300-256-256-5 MLP
    assert (
        rows[("fedavg_mlp", None)]["upload_bytes_per_site"] == 6 * 4 * n_params
    )  # its float32 weights, once per round
    for seed in (0, 1):  # the runs on disk are real federations with this seed's split
        metrics = json.loads(
            (tmp_path / "work" / "kang_pbmc_muscat" / f"seed{seed}" / "scdd-k1" / "metrics.json").read_text()
        )
        assert metrics["pretrain"]["source"] == "fedavg" and metrics["pretrain"]["schedule"]["rounds"] == 6
    assert rows[("scdd", 1)]["accuracy_mean"] > rows[("random", 1)]["accuracy_mean"] + 0.02
    assert len(set(result["split_hashes"])) == 2 and all(len(r["accuracy_per_seed"]) == 2 for r in result["rows"])
    assert (
        rows[("random", 1)]["seed_mia"] >= 0.95 and rows[("random", 1)]["dcr_share"] >= 0.95
    )  # uploaded real cells: the audit sees them
    assert rows[("scdd", 1)]["seed_mia"] < rows[("random", 1)]["seed_mia"]
    assert "seed_mia" not in rows[("centralized", None)]
    # the federated row counts the distill message on the wire (codes, per-class counts, the record's framing, and
    # under recenter, the default, one class-mean row of 300 float32 per class): without the class means still below
    # 5 real cells of 300 genes, and the class means add at most one such row per class
    class_means = 5 * 300 * 4
    assert rows[("scdd", 1)]["upload_bytes_per_site"] - class_means < rows[("random", 1)]["upload_bytes_per_site"]
    assert rows[("scdd", 1)]["upload_bytes_per_site"] > class_means
    md = (tmp_path / "kang_pbmc_muscat" / "results.md").read_text()
    assert md.startswith("# kang_pbmc_muscat") and "shipped federation" in md and "| fedavg_mlp |" in md


def _left_out(example_path: Path, methods: str, site: str, *more: str) -> list[str]:
    """`scdd benchmark` of ``methods`` at k = 2, one seed, logistic regression, 200 genes, without ``site``."""
    return [
        *f"benchmark {example_path} --methods {methods} --k 2 --seeds 1 --evaluators logreg".split(),
        *f"--n-genes 200 --leave-out {site}".split(),
        *more,
    ]


def test_benchmark_leave_one_site_out_scores_the_left_out_site_only(tmp_path: Path, example_path: Path) -> None:
    rc = main(_left_out(example_path, "random,local,centralized", "stim107", "--out", str(tmp_path)))
    assert rc == 0
    result = json.loads((tmp_path / "kang_pbmc_muscat" / "results.json").read_text())
    assert result["left_out"] == "stim107" and result["per_seed"][0]["left_out"] == "stim107"
    assert "stim107" not in result["sites"] and len(result["sites"]) == 3
    assert "left-out site stim107" in (tmp_path / "kang_pbmc_muscat" / "results.md").read_text()
    # every method's training cells get a fidelity against the scored cells: many real cells resemble them more
    # than 2 per class
    fid = {r["method"]: r["fidelity"] for r in result["rows"]}
    assert set(fid) == {"random", "local", "centralized"} and all(0 <= f["marker_overlap"] <= 1 for f in fid.values())
    assert fid["centralized"]["marker_overlap"] > fid["random"]["marker_overlap"]
    assert (
        abs(fid["centralized"]["zero_fraction_synthetic"] - fid["centralized"]["zero_fraction_real"]) < 0.1
    )  # real cells, real sparsity
    assert "## fidelity" in (tmp_path / "kang_pbmc_muscat" / "results.md").read_text()
    assert (
        main(
            [
                "benchmark",
                str(example_path),
                "--methods",
                "random",
                "--k",
                "2",
                "--seeds",
                "1",
                "--leave-out",
                "nowhere",
                "--out",
                str(tmp_path),
            ]
        )
        == 1
    )


@pytest.mark.slow
def test_benchmark_leave_one_site_out_runs_the_federation_without_that_site(tmp_path: Path, example_path: Path) -> None:
    rc = main(
        _left_out(
            example_path,
            "scdd",
            "ctrl101",
            "--set",
            "num-pretrain-rounds=2",
            "--set",
            "vae-local-steps=20",
            "--set",
            "scdg-local-steps=10",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path),
        )
    )
    assert rc == 0
    run = tmp_path / "work" / "kang_pbmc_muscat" / "seed0" / "scdd-k2"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["sites"] == [
        "ctrl107",
        "stim101",
        "stim107",
    ]  # the left-out site took no part in pretraining or codes
    synth = ad.read_h5ad(run / "synthetic.h5ad")
    assert "ctrl101" not in set(synth.obs["site"])
    row = json.loads((tmp_path / "kang_pbmc_muscat" / "results.json").read_text())["rows"][0]
    assert row["method"] == "scdd" and 0.2 < row["accuracy_mean"] <= 1  # scored on ctrl101's test cells


def test_benchmark_refuses_bad_methods_and_overrides_in_one_line(
    tmp_path: Path, example_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Usage errors (exit 2) before any work; every flag of every command: tests/server/test_cli_flags.py."""
    for extra in (
        ["--methods", "nope"],
        ["--set", "no-such-key=1"],
        ["--set", "n-genes=3"],
        ["--pretraining", "central"],
    ):
        assert main(["benchmark", str(example_path), "--out", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("scdd benchmark: error:") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_benchmark_merge_reruns_one_method_and_keeps_the_others(tmp_path: Path, example_path: Path) -> None:
    common = [
        "benchmark",
        str(example_path),
        "--k",
        "2",
        "--seeds",
        "1",
        "--evaluators",
        "mlp,knn",
        "--pretrain-steps",
        "20,20",
        "--n-genes",
        "200",
        "--out",
        str(tmp_path),
    ]
    assert main([*common, "--methods", "random,gaussian"]) == 0
    path = tmp_path / "kang_pbmc_muscat" / "results.json"
    before = {(r["method"], r["evaluator"]): r for r in json.loads(path.read_text())["rows"]}
    assert main([*common, "--methods", "gaussian", "--merge"]) == 0
    after = json.loads(path.read_text())
    rows = {(r["method"], r["evaluator"]): r for r in after["rows"]}
    assert set(rows) == set(before)  # nothing lost, nothing duplicated
    assert rows[("random", "mlp")] == before[("random", "mlp")]  # kept as it was
    assert after["merged"]["rerun_methods"] == ["gaussian"] and after["merged"]["kept_methods"] == ["random"]
    assert [r["method"] for r in after["rows"]] == [
        "random",
        "random",
        "gaussian",
        "gaussian",
    ]  # the benchmark's method order
    assert "merged into the earlier results" in (tmp_path / "kang_pbmc_muscat" / "results.md").read_text()
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "other_file": [{"method": "dm"}]}))
    assert main([*common, "--methods", "random", "--merge"]) == 0  # a second merge: gaussian was rerun before
    again = json.loads(path.read_text())["merged"]
    assert again["rerun_methods"] == ["random"] and again["earlier_reruns"] == ["gaussian"]
    md = (tmp_path / "kang_pbmc_muscat" / "results.md").read_text()
    assert "Rows of gaussian came from an earlier such rerun" in md
    assert set(json.loads(summary.read_text())) == {"kang_pbmc_muscat", "other_file"}  # other datasets kept
    assert main([*common, "--methods", "gaussian"]) == 0  # without --merge the file holds this run only
    assert {r["method"] for r in json.loads(path.read_text())["rows"]} == {"gaussian"}
    assert (
        main([*common, "--seeds", "2", "--methods", "random", "--merge"]) == 2
    )  # seed 1 is another split: nothing to merge into
    assert {r["method"] for r in json.loads(path.read_text())["rows"]} == {"gaussian"}
