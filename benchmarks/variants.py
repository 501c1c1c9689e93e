"""scdd distillation and decoding variants in the benchmark's multi-site setting (the `scdd benchmark` split:
obs["batch"] sites or a Dirichlet(0.5) 3-site split, pooled pretraining, codes from every site fused, an
MLP scored on the pooled held-out cells).

Usage: python benchmarks/variants.py FILE.h5ad [--k 10] [--seeds 2] [--variants expected,sample,...]
Prints MLP accuracy (mean and per seed) and seconds for each variant. Variants:
  expected, sample, both   library defaults, decoded to expected expression / with detection sampled
                           from the zero-inflation head / every code decoded both ways
  noopt-*                  no optimisation (noised real latents, one guided step)
  k1-recipe[-sample]       the old objective with the k <= 2 settings at any k (t* 600, gene-space mean
                           term, 200 iterations)
  old-*                    the objective before 2026-11-26 (latent mean + latent MMD + class 0.1 + prior),
                           as is or with one change (t* 600, gene-space mean, lr 0.01, 50 iterations,
                           no MMD, no latent mean)
  class0.1-*               class consistency 0.1, no latent terms: with the prior (and sampled), without
                           it, with the VAE label head on the re-encoded cells (decoded_class_weight 0.1)
  class1-*                 class consistency 1 + prior (the default since 2026-11-26): as is, 50
                           iterations, sampled
Every variant but the first six sets its weights explicitly, so it measures the same thing whatever
the library defaults are.
--vae-steps / --scdg-steps change the pretraining budget; --recon also scores an MLP trained on the VAE's
reconstructions of all training cells (--variants '' for that alone).
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
from shared.training import encode

OLD = {"latent_weight": 1.0, "mmd_weight": 1.0, "class_weight": 0.1}  # the objective before 2026-11-26
K1_RECIPE = {**OLD, "t_star": 600, "gene_mean_weight": 1.0, "iterations": 200}  # measured with the old objective
NEW = {"latent_weight": 0.0, "mmd_weight": 0.0, "class_weight": 1.0}  # the default since
VARIANTS: dict[str, tuple[dict[str, object], str]] = {
    "expected": ({}, "expected"),
    "sample": ({}, "sample"),
    "both": ({}, "both"),
    "noopt-expected": ({"iterations": 0}, "expected"),
    "noopt-sample": ({"iterations": 0}, "sample"),
    "noopt-both": ({"iterations": 0}, "both"),
    "k1-recipe": (K1_RECIPE, "expected"),
    "k1-recipe-sample": (K1_RECIPE, "sample"),
    "old-expected": (OLD, "expected"),
    "old-sample": (OLD, "sample"),
    "old-both": (OLD, "both"),
    "old-t600-sample": ({**OLD, "t_star": 600}, "sample"),
    "old-gene-mean-sample": ({**OLD, "gene_mean_weight": 1.0}, "sample"),
    "old-lr0.01": ({**OLD, "lr": 0.01}, "expected"),
    "old-it50": ({**OLD, "iterations": 50}, "expected"),
    "old-no-mmd": ({**OLD, "mmd_weight": 0.0}, "expected"),
    "old-no-latent": ({**OLD, "latent_weight": 0.0}, "expected"),
    "class0.1-prior": ({**NEW, "class_weight": 0.1}, "expected"),
    "class0.1-prior-sample": ({**NEW, "class_weight": 0.1}, "sample"),
    "class0.1-only": ({**NEW, "class_weight": 0.1, "prior_weight": 0.0}, "expected"),
    "class0.1-prior-decoded": ({**NEW, "class_weight": 0.1, "decoded_class_weight": 0.1}, "expected"),
    "class1-prior": (NEW, "expected"),
    "class1-prior-it50": ({**NEW, "iterations": 50}, "expected"),
    "class1-prior-sample": (NEW, "sample"),
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
    p.add_argument("--recon", action="store_true", help="also score an MLP trained on the VAE's reconstructions of all training cells (the decoder's ceiling)")
    args = p.parse_args()
    torch.set_num_threads(1)
    parts = split_sites(read_h5ad(args.file), label_key=args.label_key, site_key="batch", n_sites=3, seed=0)
    fed = prepare_federation(parts, label_key=args.label_key, n_genes=2000, seed=0)
    X_all, y_all = fed.pooled("train")
    X_te, y_te = fed.pooled("test")
    base = PretrainConfig()
    pre = pretrain(X_all, y_all, len(fed.classes), replace(base, vae=replace(base.vae, steps=args.vae_steps), scdg=replace(base.scdg, steps=args.scdg_steps)))
    if args.recon:
        recon = pre.vae.decode(torch.from_numpy(encode(pre.vae, X_all))).detach().numpy()
        accs = [score(y_te, fit_predict("mlp", recon, y_all, X_te, len(fed.classes), seed=s)).accuracy for s in range(args.seeds)]
        print(f"{args.file.rsplit('/', 1)[-1]} VAE {args.vae_steps} steps: MLP on reconstructions of all training cells "
              f"{np.mean(accs):.3f} {[round(a, 3) for a in accs]}", flush=True)
    for name in filter(None, args.variants.split(",")):
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
