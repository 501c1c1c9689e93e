"""The benchmark scripts whose output the docs quote: the accounting table (dp_noise.py), the site-gains table, the
decode-mode reference (decode_reference.py), the canary audit's chance bound and dp_summary's audit counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _table(*args: str) -> list[list[str]]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dp_noise.py"), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| 2")]


def test_dp_noise_prints_the_noise_of_both_pretraining_modes() -> None:
    small, big = _table("--statistics", "--counts", "--cells", "2000", "20000", "--epsilons", "8")
    # no DP-SGD: all of epsilon one-shot, shared by the profile, the label counts and the class means (no library
    # statistics: no count head reads them; with them the other releases had 1.69); the other releases keep their
    # public noise (calibrated at delta 1e-5) and the class means spend the rest at the site's own delta = 1/(10 n):
    # less noise than the public half (0.78) on a site under 10,000 cells, more on a larger one; either way the whole
    # run spends the target, not more
    assert small[4] == big[4] == "1.56" and small[6] == "0.00"
    assert float(small[3]) < 0.78 < float(big[3]) < 1.56 / 2 * 1.1
    assert all(7.95 <= float(row[7]) <= 8.0 for row in (small, big))
    # DP-SGD at k = 10: the class means are released too (the distillation matches them), at the other releases' noise
    (sgd,) = _table("--counts", "--cells", "2000", "--epsilons", "8")
    assert sgd[3] == sgd[4] and float(sgd[4]) > float(small[4]) and float(sgd[6]) > 0 and 7.9 <= float(sgd[7]) <= 8.0


def test_summarize_gains_prints_each_sites_mean_over_seeds(tmp_path: Path) -> None:
    """`summarize.py --gains WORK` (what benchmarks/site_gains.sh prints): per site, the mean over seeds of the
    federated, local-only and fine-tuned MLP and both gains; a site without fine-tuned scores (an older run): nan."""
    import json

    def site(fed: float, local: float, tuned: float | None) -> dict:
        entry = {"scores": {"mlp": {"accuracy": fed}}, "local_only": {"mlp": {"accuracy": local}}}
        return entry if tuned is None else {**entry, "fine_tuned": {"mlp": {"accuracy": tuned}}}

    for seed, (a, b) in enumerate(
        [(site(0.80, 0.90, 0.92), site(0.70, 0.60, None)), (site(0.90, 0.90, 0.96), site(0.70, 0.60, None))]
    ):
        run = tmp_path / "fileA" / f"seed{seed}" / "scdd-k10"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"rounds": [{"sites": {"s1": a, "s2": b}}]}))
    running = tmp_path / "fileA" / "seed2" / "scdd-k10"  # a run still in progress: no evaluated round yet
    running.mkdir(parents=True)
    (running / "metrics.json").write_text(json.dumps({"rounds": []}))
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "summarize.py"), "--gains", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    rows = {
        r[1]: r
        for r in ([c.strip() for c in line.strip("|").split("|")] for line in out.splitlines())
        if r[0] == "fileA"
    }
    assert rows["s1"][2:] == ["0.850", "0.900", "-0.050", "0.940", "+0.040", "2"]
    assert rows["s2"][2:5] == ["0.700", "0.600", "+0.100"] and rows["s2"][5] == "nan"
    assert "- federated: at least local-only at 1 of 2 sites (ties included), mean gain +0.025, smallest -0.050" in out
    assert "- fine-tuned: at least local-only at 1 of 1 sites (ties included), mean gain +0.040, smallest +0.040" in out
    empty = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "summarize.py"), "--gains", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert empty.returncode == 1 and "no NAME/seedS/scdd-k10/metrics.json" in empty.stdout


@pytest.mark.slow
def test_decode_reference_compares_decode_modes_with_real_cells(tmp_path: Path, example_path: Path) -> None:
    """`decode_reference.py RUN`: marker overlap, zeros and accuracy of real cells and of each decode mode of a run's
    codes; a folder that is not a finished run is refused with one line."""
    from server.cli.simulation import run_in_process

    cache = tmp_path / "cache"
    cfg = {
        "sim-data-path": str(example_path),
        "sim-site-key": "batch",
        "out-dir": str(tmp_path),
        "run-id": "tiny",
        "n-genes": 200,
        "num-pretrain-rounds": 1,
        "vae-local-steps": 60,
        "scdg-local-steps": 20,
        "distill-iterations": 5,
        "mlp-min-steps": 30,
        "mlp-max-steps": 30,
        "report": False,
    }
    run_in_process(cfg, num_nodes=4, node_configs=[{"cache-dir": str(cache)}] * 4)
    script = str(ROOT / "benchmarks" / "decode_reference.py")
    args = [sys.executable, script, str(tmp_path / "tiny"), "--samples", "2", "--cache", str(cache)]

    def table(*extra: str) -> dict[str, list[str]]:
        out = subprocess.run([*args, *extra], capture_output=True, text=True, check=True, timeout=600).stdout
        return {r[1]: r[2:] for r in ([c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()[2:])}

    rows = table("--modes", "expected,counts", "--draws", "2")
    assert list(rows)[:4] == [
        "real, all training cells",
        "real, 10 per class per site",
        "expected",
        "counts, 2 per code",
    ]
    real_all, real_few, expected, counts = (list(map(float, rows[k])) for k in list(rows)[:4])
    # columns: markers vs validation cells, markers vs all cells, zero fraction, MLP, LR
    assert real_all[1] >= 0.8  # the training cells are most of "all cells"
    assert real_few[1] > expected[1]  # smooth expected cells rank markers by ties
    assert expected[2] == 0.0 and 0.3 < counts[2] < 1.0  # sampled counts have zeros, the expected expression none
    assert all(0.0 <= v <= 1.0 for r in (real_all, real_few, expected, counts) for v in r)
    # --draws 2 averages two draws of the counts (other figures than the first draw alone); real cells are fixed
    once = table("--modes", "counts")
    assert once["real, all training cells"][:3] == rows["real, all training cells"][:3]
    assert once["counts, 2 per code"] != rows["counts, 2 per code"]
    # --weigh-draws reweighs only the logistic regression: the same draw, fidelity and MLP as without it
    weighed = table("--modes", "counts", "--weigh-draws")
    assert weighed["counts, 2 per code, weighted"][:4] == once["counts, 2 per code"][:4]
    assert weighed["real, all training cells"] == once["real, all training cells"]
    bad = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "not a finished run" in bad.stderr


def _script(name: str):  # a benchmark script as a module (benchmarks/ is not a package)
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_canary_bound_is_the_chance_spread_of_the_largest_of_the_attacks() -> None:
    """30 planted vs 30 held-out canaries: one AUC's 95th percentile without signal is 0.5 + 1.645 sqrt(61 / 10800) =
    0.624; the largest of three attacks that agree has the same bound, of three unrelated ones a higher one."""
    canary = _script("canary_audit")
    rng = np.random.default_rng(0)
    one = (rng.normal(size=30), rng.normal(size=30))
    same = canary.max_null_bound({"a": one, "b": one, "c": one}, seed=0)
    apart = canary.max_null_bound({k: (rng.normal(size=30), rng.normal(size=30)) for k in "abc"}, seed=0)
    assert abs(same - 0.624) < 0.03 and apart > same + 0.02, (same, apart)


def test_dp_summary_counts_the_site_audits_above_their_chance_bound(tmp_path: Path) -> None:
    sites = {
        "a": {"audit": {"seed_mia": 0.62, "seed_mia_null95": 0.6, "density_mia": 0.55, "density_mia_null95": 0.6}},
        "b": {"audit": {"seed_mia": 0.57, "seed_mia_null95": 0.6, "density_mia": 0.58, "density_mia_null95": 0.6}},
    }
    scores = {"mlp": {"accuracy": 0.8}, "logreg": {"accuracy": 0.8}}
    validation = {"cell_weighted": {"mlp": {"accuracy": 0.7}, "logreg": {"accuracy": 0.75}}}
    metrics = {
        "rounds": [{"sites": sites, "aggregate": {"cell_weighted": scores, "validation": validation}}],
        "privacy": {},
    }
    run = tmp_path / "kang-eps8-seed0"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "kang-eps8-seed0.log").write_text("done\n")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dp_summary.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "| kang | 8 | 0.620 (1 of 2) |  | 0.580 (0 of 2) |" in out, out
    assert "| kang | 8 | 1 | 0.800 | 0.800 | 0.700 | 0.750 |" in out, out  # the mean over seeds, validation beside test
    assert "| 8 | 1 | 0.800 | 0.800 | 0.700 | 0.750 |" in out.splitlines(), out  # every run at that epsilon, all files
