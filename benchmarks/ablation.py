"""Ablations of scdd's distillation settings on one file (pooled pretraining, one 80/20 split).

Usage: python benchmarks/ablation.py FILE.h5ad [--k 1,10,50] [--seeds 2] [--out DIR]
Prints MLP held-out accuracy (mean over evaluator seeds) and seconds for each variant and writes
ablation.json. Variants: default, no gene-space mean term, gene-space mean term on, guidance 0,
noise init, t*=200/800, no MMD, random-network gene DM on, no optimisation.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from shared.data import read_h5ad
from shared.distill import DistillConfig, distill_codes, generate
from shared.evaluation import fit_predict, score
from shared.pretrain import PretrainConfig, pretrain
from shared.sites import prepare_federation

VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "no-gene-mean": {"gene_mean_weight": 0.0},
    "gene-mean-on": {"gene_mean_weight": 1.0},
    "guidance-0": {"guidance": 0.0},
    "noise-init": {"init": "noise"},
    "t*=200": {"t_star": 200},
    "t*=800": {"t_star": 800},
    "no-mmd": {"mmd_weight": 0.0},
    "random-net-gene-dm": {"gene_weight": 1.0},
    "no-optimisation": {"iterations": 0},
}


def main() -> int:
    """Run every variant at every k and print a table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("file")
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--k", default="1,10,50")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", default="benchmarks/ablation")
    args = p.parse_args()
    fed = prepare_federation({"pooled": read_h5ad(args.file)}, label_key=args.label_key, n_genes=2000, seed=0)
    X, y = fed.train(0)
    X_te, y_te = fed.test(0)
    pre = pretrain(X, y, len(fed.classes), PretrainConfig())
    rows = []
    for k in [int(v) for v in args.k.split(",")]:
        for name, change in VARIANTS.items():
            cfg = replace(DistillConfig(k=k), **change)
            t0 = time.perf_counter()
            codes = distill_codes(pre.vae, pre.scdg, X, y, cfg)
            secs = time.perf_counter() - t0
            cells = generate(pre.vae, pre.scdg, codes, mode="expected")
            acc = np.mean([score(y_te, fit_predict("mlp", cells, codes.labels, X_te, len(fed.classes), seed=s)).accuracy for s in range(args.seeds)])
            rows.append({"k": k, "variant": name, "accuracy": float(acc), "seconds": secs})
            print(f"k={k:<3} {name:<20} acc {acc:.3f}  ({secs:.1f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{Path(args.file).stem}.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
