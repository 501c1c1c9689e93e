"""Implementations of the `scdd` subcommands (a CLI may print; library code below it logs)."""

from __future__ import annotations

import argparse
import logging
import platform
import time
import warnings
from pathlib import Path

from shared.io import write_h5ad, write_json, write_text

logger = logging.getLogger(__name__)


def check(args: argparse.Namespace) -> int:
    """`scdd check FILE`: validate a site's file against the data contract."""
    from shared.data import check_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report lists them once
        report = check_file(args.file, label_key=args.label_key, expect=args.expect, min_cells_per_class=args.min_cells_per_class)
    print(report.summary())
    print("OK: this file can join a federation.")
    return 0


def distill(args: argparse.Namespace) -> int:
    """`scdd distill FILE --out synth.h5ad`: single-site distillation with numbers."""
    from shared.distill import DistillConfig
    from shared.pretrain import PretrainConfig
    from shared.single_site import distill_file

    out = Path(args.out)
    report = distill_file(
        args.file,
        label_key=args.label_key,
        expect=args.expect,
        n_genes=args.n_genes,
        distill=DistillConfig(k=args.k, iterations=args.iterations, seed=args.seed),
        pretrain_cfg=PretrainConfig(seed=args.seed),
        seed=args.seed,
    )
    write_h5ad(out, report.synthetic)
    print(report.summary())
    print(f"wrote {out} ({report.synthetic.n_obs} cells x {report.synthetic.n_vars} genes)")
    return 0


def _benchmark_config(args: argparse.Namespace):  # noqa: ANN202 - local import of the return type
    from shared.benchmark import METHODS, BenchmarkConfig
    from shared.distill import DistillConfig
    from shared.pretrain import PretrainConfig
    from shared.training import TrainConfig

    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    pre = PretrainConfig()
    if args.pretrain_steps:
        vae_steps, scdg_steps = (args.pretrain_steps * 2)[:2]
        pre = PretrainConfig(vae=TrainConfig(steps=vae_steps, lr=pre.vae.lr, batch_size=pre.vae.batch_size), scdg=TrainConfig(steps=scdg_steps, lr=pre.scdg.lr, batch_size=pre.scdg.batch_size))
    return BenchmarkConfig(
        methods=methods,
        ks=args.k,
        seeds=args.seeds,
        evaluators=tuple(args.evaluators.split(",")),
        distill=DistillConfig(iterations=args.iterations),
        dm_iterations=args.dm_iterations,
        pretrain=pre,
    )


def benchmark(args: argparse.Namespace) -> int:
    """`scdd benchmark FILE...`: every method at every k, results.md + results.json per dataset."""
    from tqdm.auto import tqdm

    from shared import benchmark as bm
    from shared.data import read_h5ad
    from shared.sites import prepare_federation, split_sites

    cfg = _benchmark_config(args)
    out = Path(args.out)
    summary = {}
    for path in args.files:
        name = Path(path).stem
        adata = read_h5ad(path)
        parts = split_sites(adata, label_key=args.label_key, site_key=args.site_key, n_sites=args.sites, seed=0)
        fed = prepare_federation(parts, label_key=args.label_key, n_genes=args.n_genes, seed=0)
        n_tasks = sum(cfg.seeds * (1 if m in bm.K_FREE else len(cfg.ks)) for m in cfg.methods)
        header = (
            f"{len(fed.sites)} sites ({', '.join(fed.names)}), {len(fed.genes)} genes, {len(fed.classes)} classes; "
            f"{cfg.seeds} seeds; pooled test set of all sites. The latent space and SCDG were pretrained on the sites' "
            "POOLED training cells (stand-in for federated pretraining)."
        )
        t0 = time.perf_counter()
        with tqdm(total=n_tasks, desc=name, unit="run") as bar:
            cells, pre = bm.run(fed, cfg, progress=lambda msg: (bar.set_postfix_str(msg), bar.update(1)))
        rows = bm.rows(cells)
        result = {
            "dataset": name,
            "rows": rows,
            "pretrain_seconds": {"vae": pre.vae_seconds, "scdg": pre.scdg_seconds},
            "sites": list(fed.names),
            "n_genes": len(fed.genes),
            "n_classes": len(fed.classes),
            "wall_seconds": time.perf_counter() - t0,
            "pretraining": "pooled",
            "python": platform.python_version(),
        }
        write_json(out / name / "results.json", result)
        md = bm.markdown(name, rows, cfg.ks, header + f" Pretraining: VAE {pre.vae_seconds:.1f} s, SCDG {pre.scdg_seconds:.1f} s.")
        write_text(out / name / "results.md", md)
        summary[name] = rows
        print(md)
    write_json(out / "summary.json", summary)
    print(f"wrote {out}/<dataset>/results.md and results.json")
    return 0
