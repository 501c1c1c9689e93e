"""scdd distillation and decoding variants in the benchmark's multi-site setting (the `scdd benchmark` split:
obs["batch"] sites or a Dirichlet(0.5) 3-site split, pooled pretraining, codes from every site fused, an
MLP scored on the pooled held-out cells).

Usage: python benchmarks/variants.py FILE.h5ad [--k 10] [--seeds 2] [--variants expected,sample,...]
Prints MLP accuracy (mean and per seed) and seconds for each variant. Variants:
  expected        library defaults, decoded to expected expression (the default)
  sample          library defaults, detection sampled from the zero-inflation head
  k1-recipe       the k <= 2 settings at any k (t* 600, gene-space mean term, 200 iterations), expected
  k1-recipe-sample, t600-sample, gene-mean-sample, it200-sample: the same changes, sampled
  both            library defaults, every code decoded twice: expected and sampled
  noopt-expected, noopt-sample, noopt-both: no optimisation (noised real latents, one step)
  lr0.01-expected, it50-expected, no-mmd-expected, no-latent-expected, class-prior-only: objective and
                  budget changes, decoded to expected expression
--vae-steps / --scdg-steps change the pretraining budget.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from shared.data import read_h5ad
from shared.distill import DistillConfig, distill_codes, generate
from shared.evaluation import fit_predict, score
from shared.pretrain import PretrainConfig, pretrain
from shared.sites import prepare_federation, split_sites

K1_RECIPE = {"t_star": 600, "gene_mean_weight": 1.0, "iterations": 200}
VARIANTS: dict[str, tuple[dict[str, object], str]] = {
    "expected": ({}, "expected"),
    "sample": ({}, "sample"),
    "k1-recipe": (K1_RECIPE, "expected"),
    "k1-recipe-sample": (K1_RECIPE, "sample"),
    "t600-sample": ({"t_star": 600}, "sample"),
    "gene-mean-sample": ({"gene_mean_weight": 1.0}, "sample"),
    "it200-sample": ({"iterations": 200}, "sample"),
    "both": ({}, "both"),
    "noopt-expected": ({"iterations": 0}, "expected"),
    "noopt-sample": ({"iterations": 0}, "sample"),
    "noopt-both": ({"iterations": 0}, "both"),
    "lr0.01-expected": ({"lr": 0.01}, "expected"),
    "it50-expected": ({"iterations": 50}, "expected"),
    "no-mmd-expected": ({"mmd_weight": 0.0}, "expected"),
    "no-latent-expected": ({"latent_weight": 0.0}, "expected"),
    "class-prior-only": ({"latent_weight": 0.0, "mmd_weight": 0.0}, "expected"),
    "class1-prior": ({"latent_weight": 0.0, "mmd_weight": 0.0, "class_weight": 1.0}, "expected"),
    "class-only": ({"latent_weight": 0.0, "mmd_weight": 0.0, "prior_weight": 0.0}, "expected"),
    "class-decoded-prior": ({"latent_weight": 0.0, "mmd_weight": 0.0, "decoded_class_weight": 0.1}, "expected"),
    "class-prior-sample": ({"latent_weight": 0.0, "mmd_weight": 0.0}, "sample"),
    "class1-prior-genemean": ({"latent_weight": 0.0, "mmd_weight": 0.0, "class_weight": 1.0, "gene_mean_weight": 1.0}, "expected"),
    "class1-prior-it50": ({"latent_weight": 0.0, "mmd_weight": 0.0, "class_weight": 1.0, "iterations": 50}, "expected"),
    "class1-prior-sample": ({"latent_weight": 0.0, "mmd_weight": 0.0, "class_weight": 1.0}, "sample"),
}


def main() -> int:
    """Pretrain once, then distill + decode + score every variant."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--vae-steps", type=int, default=PretrainConfig().vae.steps)
    p.add_argument("--scdg-steps", type=int, default=PretrainConfig().scdg.steps)
    args = p.parse_args()
    torch.set_num_threads(1)
    parts = split_sites(read_h5ad(args.file), label_key=args.label_key, site_key="batch", n_sites=3, seed=0)
    fed = prepare_federation(parts, label_key=args.label_key, n_genes=2000, seed=0)
    X_all, y_all = fed.pooled("train")
    X_te, y_te = fed.pooled("test")
    base = PretrainConfig()
    pre = pretrain(X_all, y_all, len(fed.classes), replace(base, vae=replace(base.vae, steps=args.vae_steps), scdg=replace(base.scdg, steps=args.scdg_steps)))
    for name in args.variants.split(","):
        change, mode = VARIANTS[name]
        accs, t0 = [], time.perf_counter()
        for seed in range(args.seeds):
            cells, labels = [], []
            for i in range(len(fed.sites)):
                X, y = fed.train(i)
                codes = distill_codes(pre.vae, pre.scdg, X, y, replace(DistillConfig(k=args.k, seed=seed + 1000 * i), **change))
                for m in ("expected", "sample") if mode == "both" else (mode,):
                    cells.append(generate(pre.vae, pre.scdg, codes, mode=m, seed=seed))  # type: ignore[arg-type]
                    labels.append(codes.labels)
            torch.manual_seed(seed)
            pred = fit_predict("mlp", np.concatenate(cells), np.concatenate(labels), X_te, len(fed.classes), seed=seed)
            accs.append(score(y_te, pred).accuracy)
        print(f"{args.file.rsplit('/', 1)[-1]} k={args.k} {name:<18} MLP {np.mean(accs):.3f} {[round(a, 3) for a in accs]} "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
