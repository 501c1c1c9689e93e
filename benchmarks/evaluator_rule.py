"""Choose the evaluation MLP's training rule on VALIDATION cells (never test cells).

For each file and seed, the benchmark's sites and splits are drawn (`server.bench.benchmark.prepare_seed`,
no pretraining needed) and the MLP is trained under every candidate rule on training sets of very
different sizes: k random real cells per class per site (k = 1, 10, 50, fused over sites, as a
distilled set would be) and all training cells (centralized). It is scored on the pooled validation
cells. The rule with the best mean over files, seeds and set sizes becomes `MLPTrainConfig`'s default;
a rule that is good for tiny sets but starves large ones (or the reverse) shows in the per-size columns.

Usage: python benchmarks/evaluator_rule.py FILE.h5ad ... [--seeds 2] [--out benchmarks/results/evaluator_rule.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from server.bench.baselines import coreset
from server.bench.benchmark import BenchmarkConfig, SplitConfig, prepare_seed
from shared.data import read_h5ad
from shared.evaluation import MLPTrainConfig, fit_predict, score
from shared.io import write_text

logger = logging.getLogger(__name__)

# (epochs, min_steps, max_steps); the first one is the old fixed rule (400 steps at any size).
CANDIDATES = [
    (1e-9, 400, 400),
    (10, 200, 2000),
    (20, 300, 3000),
    (30, 300, 5000),
    (50, 500, 5000),
    (20, 500, 5000),
    (100, 300, 5000),
]
SIZES = ("k=1", "k=10", "k=50", "all")


def _sets(fed, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for k in (1, 10, 50):
        parts = [coreset(*fed.train(i), k, method="random", seed=seed + 100 * i) for i in range(len(fed.sites))]
        out[f"k={k}"] = (np.concatenate([p.X for p in parts]), np.concatenate([p.labels for p in parts]))
    out["all"] = fed.pooled("train")
    return out


def main() -> None:
    """Score every candidate rule on validation cells; print and write a table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/evaluator_rule.md")
    args = ap.parse_args()
    acc: dict[tuple[float, int, int], dict[str, list[float]]] = {c: {s: [] for s in SIZES} for c in CANDIDATES}
    steps: dict[tuple[float, int, int], dict[str, list[int]]] = {c: {s: [] for s in SIZES} for c in CANDIDATES}
    t0 = time.perf_counter()
    for path in args.files:
        adata = read_h5ad(path)
        for seed in range(args.seeds):
            fed = prepare_seed(adata, BenchmarkConfig(split=SplitConfig()), seed, pretrain_models=False).fed
            X_val, y_val = fed.pooled("val")
            for size, (X, y) in _sets(fed, seed).items():
                for cand in CANDIDATES:
                    mlp = MLPTrainConfig(epochs=cand[0], min_steps=cand[1], max_steps=cand[2])
                    pred = fit_predict("mlp", X, y, X_val, len(fed.classes), seed=seed, mlp=mlp)
                    acc[cand][size].append(score(y_val, pred).accuracy)
                    steps[cand][size].append(mlp.steps(X.shape[0]))
            print(f"{Path(path).stem} seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    lines = [
        "# Evaluation MLP training rule, chosen on validation cells",
        "",
        f"Command: `python benchmarks/evaluator_rule.py {' '.join(Path(f).name for f in args.files)} "
        f"--seeds {args.seeds}` (files from ../shared/data). "
        "MLP accuracy on the pooled VALIDATION cells of all sites, mean over files and seeds; "
        "training sets: k random real cells per class per site (fused) and all training cells. "
        "Steps = ceil(epochs x n / 256) clipped to [min, max]; "
        "the first row is the old fixed rule (400 steps at any size).",
        "",
        "| epochs / min steps / max steps | "
        + " | ".join(SIZES)
        + " | mean | median steps at "
        + " / ".join(SIZES)
        + " |",
        "|---|" + "---|" * (len(SIZES) + 2),
    ]
    means = {}
    for cand in CANDIDATES:
        per = [float(np.mean(acc[cand][s])) for s in SIZES]
        means[cand] = float(np.mean(per))
        label = "fixed 400" if cand[0] < 1e-6 else f"{cand[0]:g} / {cand[1]} / {cand[2]}"
        med = " / ".join(str(int(np.median(steps[cand][s]))) for s in SIZES)
        lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" for v in per) + f" | {means[cand]:.4f} | {med} |")
    best = max(means, key=means.get)
    lines += ["", f"Best mean: epochs {best[0]:g}, min {best[1]}, max {best[2]} ({means[best]:.4f}).", ""]
    write_text(Path(args.out), "\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(
        json.dumps(
            {"candidates": [list(c) for c in CANDIDATES], "accuracy": {str(c): acc[c] for c in CANDIDATES}}, indent=1
        ),
        encoding="utf-8",
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
