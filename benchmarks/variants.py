"""scdd distillation and decoding variants, scored on VALIDATION cells only (how defaults are chosen).

The benchmark's multi-site setting (`server.bench.benchmark.prepare_seed`: obs["batch"] sites or a Dirichlet(0.5)
3-site split, each site split 70 / 10 / 20 into train / validation / test, pooled pretraining, codes from every
site fused, the evaluation MLP), averaged over files and seeds; every seed re-draws the site split (Dirichlet
files), the per-site splits, pretraining and distillation. Test cells are never scored here.

Usage: python benchmarks/variants.py FILE.h5ad [FILE.h5ad ...] [--k 10] [--seeds 2] [--variants expected,sample,...]
Prints, per variant, MLP accuracy on the pooled validation cells (mean over files and seeds, then per file) and seconds.
  expected, sample, both   library defaults, decoded to expected expression / with detection sampled from the
                           zero-inflation head / every code decoded both ways
  noopt-*                  no optimisation (noised real latents, one guided step)
  old-*, class*-*          the objective before 2026-11-26 (latent mean + MMD + class 0.1 + prior) and the
                           class-consistency variants that replaced it (weights set explicitly)
  noise-init, guidance-0, t200, t800, gene-mean-on/off, random-net-gene-dm   single changes to today's defaults
--vae-steps / --scdg-steps change the pretraining budget; --recon also scores an MLP trained on the VAE's
reconstructions of all training cells (the decoder's ceiling; --variants '' for that alone).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from server.bench.benchmark import BenchmarkConfig, prepare_seed
from shared.data import read_h5ad
from shared.distill import DistillConfig, distill_codes, generate
from shared.evaluation import fit_predict, score
from shared.fitting import encode
from shared.pretrain import PretrainConfig

OLD = {"latent_weight": 1.0, "mmd_weight": 1.0, "class_weight": 0.1}  # the objective before 2026-11-26
NEW = {"latent_weight": 0.0, "mmd_weight": 0.0, "class_weight": 1.0}  # the default since
VARIANTS: dict[str, tuple[dict[str, object], str]] = {
    "expected": ({}, "expected"),
    "sample": ({}, "sample"),
    "both": ({}, "both"),
    "noopt-expected": ({"iterations": 0}, "expected"),
    "noopt-sample": ({"iterations": 0}, "sample"),
    "old-expected": (OLD, "expected"),
    "old-sample": (OLD, "sample"),
    "class0.1-prior": ({**NEW, "class_weight": 0.1}, "expected"),
    "class0.1-only": ({**NEW, "class_weight": 0.1, "prior_weight": 0.0}, "expected"),
    "class1-prior": (NEW, "expected"),
    "class1-prior-it50": ({**NEW, "iterations": 50}, "expected"),
    "noise-init": ({"init": "noise"}, "expected"),
    "guidance-0": ({"guidance": 0.0}, "expected"),
    "t200": ({"t_star": 200}, "expected"),
    "t800": ({"t_star": 800}, "expected"),
    "gene-mean-on": ({"gene_mean_weight": 1.0}, "expected"),
    "gene-mean-off": ({"gene_mean_weight": 0.0}, "expected"),
    "random-net-gene-dm": ({"gene_weight": 1.0}, "expected"),
}


def _score_variant(run, name: str, k: int) -> float:
    change, mode = VARIANTS[name]
    fed, pre = run.fed, run.pre
    cells, labels = [], []
    for i in range(len(fed.sites)):
        codes = distill_codes(
            pre.vae, pre.scdg, *fed.train(i), replace(DistillConfig(k=k, seed=run.seed * 7919 + 1000 * i), **change)
        )
        for m in ("expected", "sample") if mode == "both" else (mode,):
            cells.append(generate(pre.vae, pre.scdg, codes, mode=m, seed=run.seed))  # type: ignore[arg-type]
            labels.append(codes.labels)
    X_val, y_val = fed.pooled("val")
    pred = fit_predict("mlp", np.concatenate(cells), np.concatenate(labels), X_val, len(fed.classes), seed=run.seed)
    return score(y_val, pred).accuracy


def main() -> int:
    """Per file and seed: split and pretrain once, then distill + decode + score every variant on validation cells."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--vae-steps", type=int, default=PretrainConfig().vae.steps)
    p.add_argument("--scdg-steps", type=int, default=PretrainConfig().scdg.steps)
    p.add_argument(
        "--recon",
        action="store_true",
        help="also score an MLP trained on the VAE's reconstructions of all training cells",
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    base = PretrainConfig()
    cfg = BenchmarkConfig(
        pretrain=replace(
            base, vae=replace(base.vae, steps=args.vae_steps), scdg=replace(base.scdg, steps=args.scdg_steps)
        )
    )
    names = [n for n in args.variants.split(",") if n]
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    secs: dict[str, float] = defaultdict(float)
    print(
        f"scored on VALIDATION cells (pooled over sites), k={args.k}, {args.seeds} seeds per file; "
        "test cells are never read",
        flush=True,
    )
    for path in args.files:
        adata, stem = read_h5ad(path), Path(path).stem
        for seed in range(args.seeds):
            run = prepare_seed(adata, cfg, seed, pretrain_models=True)
            if args.recon:
                X_all, y_all = run.fed.pooled("train")
                recon = run.pre.vae.decode(torch.from_numpy(encode(run.pre.vae, X_all))).detach().numpy()
                X_val, y_val = run.fed.pooled("val")
                acc["recon"][stem].append(
                    score(y_val, fit_predict("mlp", recon, y_all, X_val, len(run.fed.classes), seed=seed)).accuracy
                )
            for name in names:
                t0 = time.perf_counter()
                acc[name][stem].append(_score_variant(run, name, args.k))
                secs[name] += time.perf_counter() - t0
            print(f"  {stem} seed {seed} done", flush=True)
    for name in (["recon"] if args.recon else []) + names:
        per_file = {f: float(np.mean(v)) for f, v in acc[name].items()}
        print(
            f"{name:<20} VALIDATION MLP {np.mean(list(per_file.values())):.3f}  "
            + "  ".join(f"{f} {v:.3f}" for f, v in per_file.items())
            + f"  ({secs[name]:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
