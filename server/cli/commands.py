"""Implementations of the `scdd` subcommands: CLI code, so it prints for the user (library code logs)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import time
import warnings
from pathlib import Path

from shared.errors import ConfigError
from shared.io import write_h5ad, write_json, write_text

logger = logging.getLogger(__name__)


def check(args: argparse.Namespace) -> int:
    """`scdd check FILE`: validate a site's file against the data contract."""
    from shared.data import check_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report lists them once
        report = check_file(
            args.file, label_key=args.label_key, expect=args.expect, min_cells_per_class=args.min_cells_per_class
        )
    print(report.summary())
    print("OK: this file can join a federation.")
    return 0


def distill(args: argparse.Namespace) -> int:
    """`scdd distill FILE --out synth.h5ad`: single-site distillation with numbers."""
    from server.cli.single_site import distill_file
    from shared.distill import DistillConfig

    out = Path(args.out)
    report = distill_file(
        args.file,
        label_key=args.label_key,
        expect=args.expect,
        n_genes=args.n_genes,
        distill=DistillConfig(k=args.k, iterations=args.iterations, seed=args.seed),
        pretrain_cfg=_pretrain_config(args.pretrain_steps, args.seed),
        embedding_key=args.embedding_key,
        seed=args.seed,
    )
    write_h5ad(out, report.synthetic)
    print(report.summary())
    print(f"wrote {out} ({report.synthetic.n_obs} cells x {report.synthetic.n_vars} genes)")
    return 0


def pretrain(args: argparse.Namespace) -> int:
    """`scdd pretrain REFERENCE.h5ad --label-key KEY --out DIR`: models for init-path / pretrained-path."""
    from server.reference import pretrain_reference

    if args.n_genes < 10:
        msg = f"--n-genes must be >= 10, got {args.n_genes}"
        raise ConfigError(msg)
    out = pretrain_reference(
        args.file,
        args.out,
        label_key=args.label_key,
        n_genes=args.n_genes,
        expect=args.expect,
        cfg=_pretrain_config(args.pretrain_steps, args.seed),
    )
    info = json.loads((out / "reference.json").read_text(encoding="utf-8"))
    print(
        f"pretrained on {info['n_cells']} cells x {info['n_genes']} genes, {len(info['classes'])} classes in {info['seconds']} s"
    )
    print(
        f"wrote {out}/plan.json, vae.pt, scdg.pt; use it with --set init-path={out} (FedAvg starts from it) "
        f"or pretrained-path={out} (no FedAvg; the sites' labels must be the reference's)"
    )
    return 0


def _pretrain_config(steps: tuple[int, ...] | None, seed: int):  # noqa: ANN202
    """PretrainConfig with optional (VAE, SCDG) step counts."""
    from dataclasses import replace

    from shared.pretrain import PretrainConfig

    pre = PretrainConfig(seed=seed)
    if not steps:
        return pre
    vae_steps, scdg_steps = (steps * 2)[:2]
    return replace(
        pre, vae=replace(pre.vae, steps=vae_steps, seed=seed), scdg=replace(pre.scdg, steps=scdg_steps, seed=seed)
    )


def _benchmark_config(args: argparse.Namespace):  # noqa: ANN202 - local import of the return type
    from server.bench.benchmark import METHODS, PRETRAINING_MODE

    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    modes = {m.strip() for m in args.pretraining.split(",") if m.strip()}
    if not modes or modes - {"fedavg", "pooled"}:
        msg = f"--pretraining takes fedavg, pooled or fedavg,pooled; got {args.pretraining!r}"
        raise ConfigError(msg)
    methods = tuple(m for m in methods if PRETRAINING_MODE.get(m, "none") in modes | {"none"})
    try:
        return _make_benchmark_config(args, methods)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _make_benchmark_config(args: argparse.Namespace, methods: tuple[str, ...]):  # noqa: ANN202
    from server.bench.benchmark import BenchmarkConfig, SplitConfig
    from server.cli.simulation import parse_overrides
    from shared.distill import DistillConfig

    return BenchmarkConfig(
        methods=methods,
        ks=args.k,
        seeds=args.seeds,
        evaluators=tuple(args.evaluators.split(",")),
        distill=DistillConfig(iterations=args.iterations),
        dm_iterations=args.dm_iterations,
        pretrain=_pretrain_config(args.pretrain_steps, 0),
        split=SplitConfig(label_key=args.label_key, site_key=args.site_key, n_sites=args.sites, n_genes=args.n_genes),
        score_on=args.score_on,
        federation=tuple(parse_overrides(args.overrides).items()),
        leave_out=args.leave_out or "",
        work_dir=args.work or "",
    )


def benchmark(args: argparse.Namespace) -> int:
    """`scdd benchmark FILE...`: every method at every k, results.md + results.json per dataset."""
    from dataclasses import asdict

    from tqdm.auto import tqdm

    from server.bench import benchmark as bm
    from shared.data import read_h5ad

    cfg = _benchmark_config(args)
    out = Path(args.out)
    summary = {}
    for path in args.files:
        name = Path(path).stem
        adata = read_h5ad(path)
        old = (
            json.loads((out / name / "results.json").read_text(encoding="utf-8"))
            if args.merge and (out / name / "results.json").is_file()
            else None
        )
        if old is not None:
            hashes = [bm.prepare_seed(adata, cfg, s, pretrain_models=False).split_hash for s in range(cfg.seeds)]
            if old.get("split_hashes") != hashes:
                print(
                    f"--merge: {name}'s results.json was made on other splits ({old.get('split_hashes')} vs {hashes}): "
                    "rerun every method (drop --merge), or match --seeds and the split options"
                )
                return 2
        n_tasks = cfg.seeds * sum(1 if m in bm.K_FREE else len(cfg.ks) for m in cfg.methods)
        t0 = time.perf_counter()
        work = dataclasses.replace(cfg, work_dir=str(Path(cfg.work_dir) / name)) if cfg.work_dir else cfg
        with tqdm(total=n_tasks, desc=name, unit="run") as bar:
            cells, seeds = bm.run(path, work, progress=lambda msg: (bar.set_postfix_str(msg), bar.update(1)))
        scored = (
            f"the {cfg.score_on.upper()} cells of the left-out site {cfg.leave_out}, which took no part in pretraining or codes"
            if cfg.leave_out
            else f"the pooled {cfg.score_on.upper()} cells of all sites"
        )
        header = (
            f"{len(seeds[0]['sites'])} sites ({', '.join(seeds[0]['sites'])}), {seeds[0]['n_genes']} genes, {seeds[0]['n_classes']} classes; "
            f"{cfg.seeds} seeds (each re-draws the site split where Dirichlet, the per-site train / validation / test split, pretraining "
            f"and distillation; split hashes {', '.join(str(s['split_hash']) for s in seeds)}); scored on {scored}. "
            "scdd is the shipped federation (FedAvg pretraining, distillation rounds, fusion; run config defaults"
            + (f" with {', '.join(f'{k}={v}' for k, v in cfg.federation)}" if cfg.federation else "")
            + "); "
            "scdd_pooled the same federation from models pretrained on the sites' POOLED training cells (upper bound); "
            "fedavg_mlp FedAvg of the evaluation MLP on real cells."
        )
        rows = bm.rows(cells)
        merged_from = None
        if old is not None:
            kept = [r for r in old["rows"] if r["method"] not in cfg.methods]
            rows = sorted(
                kept + rows,
                key=lambda r: (
                    bm.METHODS.index(r["method"]) if r["method"] in bm.METHODS else len(bm.METHODS),
                    r["k"] or 0,
                    bm.EVALUATORS.index(r["evaluator"]),
                ),
            )
            merged_from = {
                "rerun_methods": list(cfg.methods),
                "kept_methods": sorted({r["method"] for r in kept}),
                "kept_wall_seconds": old.get("wall_seconds"),
            }
        result = {
            "dataset": name,
            "rows": rows,
            "split_hashes": [s["split_hash"] for s in seeds],
            "per_seed": seeds,
            "sites": seeds[0]["sites"],
            "n_genes": seeds[0]["n_genes"],
            "n_classes": seeds[0]["n_classes"],
            "wall_seconds": time.perf_counter() - t0,
            "pretraining": "fedavg (scdd, scdd_noopt); pooled (scdd_pooled)",
            "federation_overrides": dict(cfg.federation),
            "left_out": cfg.leave_out or None,
            "scored_on": cfg.score_on,
            "audit": "class-matched",  # shared.audit since the class-mix correction (results without this key predate it)
            "mlp": asdict(cfg.mlp),
            "split": asdict(cfg.split),
            "scdd_decode_mode": bm.DECODE_MODE,
            "python": platform.python_version(),
            "seeds": cfg.seeds,
        }
        if merged_from:
            result["merged"] = merged_from
            header += f" Rows of {', '.join(cfg.methods)} rerun with this version and merged into the earlier results (--merge)."
        write_json(out / name / "results.json", result)
        pre = "; ".join(
            f"seed {s['seed']}: VAE {s['pooled_pretrain_seconds']['vae']:.1f} s, SCDG {s['pooled_pretrain_seconds']['scdg']:.1f} s"
            for s in seeds
            if s["pooled_pretrain_seconds"]
        )
        md = bm.markdown(name, rows, cfg.ks, header + (f" Pooled pretraining: {pre}." if pre else ""))
        write_text(out / name / "results.md", md)
        summary[name] = rows
        print(md)
    write_json(out / "summary.json", summary)
    print(f"wrote {out}/<dataset>/results.md and results.json")
    return 0


def _outputs(run_dir: Path) -> None:
    for name in ("report.html", "synthetic.h5ad", "metrics.json"):
        if (run_dir / name).is_file():
            print(f"{name:>15}: {run_dir / name}")


def simulate(args: argparse.Namespace) -> int:
    """`scdd simulate --data FILE --out DIR`: the federation in this process (no Ray), one fake node per site."""
    from server.cli.simulation import parse_overrides, simulate_file

    overrides = {
        "sim-site-key": args.site_key,
        "label-key": args.label_key,
        "cells-per-class": args.k,
        "sim-num-sites": args.num_sites,
    }
    if args.rounds is not None:
        overrides["num-distill-rounds"] = args.rounds
    if args.device is not None:
        overrides["device"] = args.device
    overrides |= parse_overrides(args.overrides)
    if (
        "device" in overrides
    ):  # the simulated sites run in this process: a GPU they cannot see is refused now, not at the first message
        from shared.device import resolve_device

        resolve_device(str(overrides["device"]))
    t0 = time.perf_counter()
    run_dir = simulate_file(Path(args.data), out=Path(args.out), overrides=overrides)
    print(f"federated run finished in {time.perf_counter() - t0:.1f} s")
    _outputs(run_dir)
    return 0


def demo(args: argparse.Namespace) -> int:
    """`scdd demo`: the real Flower simulation (flwr run, Ray) on the bundled example data; non-zero unless it completed."""
    import sys

    from server.cli.demo import DemoFailed, run_demo
    from server.cli.simulation import parse_overrides

    try:
        result = run_demo(Path(args.out), timeout_s=args.timeout, overrides=parse_overrides(args.overrides), echo=print)
    except DemoFailed as exc:
        print(f"\n*** scdd demo FAILED: {exc}", file=sys.stderr)
        return 2
    print(f"\nFlower run {result.flower_run_id}: {result.status} in {result.seconds:.0f} s")
    _outputs(result.run_dir)
    return 0


def report(args: argparse.Namespace) -> int:
    """`scdd report RUN_DIR`: (re)write report.html."""
    from server.report import write_report

    print(f"wrote {write_report(Path(args.run_dir))}")
    return 0


def flwr_connection(args: argparse.Namespace) -> int:
    """`scdd flwr-connection [NAME] --address HOST:PORT --root-certificates ca.crt`: merge the connection into flwr's config."""
    from server.cli.deployment import superlink_health, write_connection

    path = write_connection(args.name, args.address, Path(args.root_certificates), make_default=not args.no_default)
    default = "" if args.no_default else " (the default)"
    print(f"connection '{args.name}'{default} -> https://{args.address} written to {path}")
    health = superlink_health(args.address, Path(args.root_certificates).expanduser().resolve())
    if health == "ok":
        print(f"SuperLink at {args.address}: healthy")
    else:
        print(f"SuperLink at {args.address} not reachable yet ({health}); flwr commands will work once it is")
    return 0


def verify_bundle(args: argparse.Namespace) -> int:
    """`scdd verify-bundle APP --source CHECKOUT`: exit 0 only when the installed app is the release's code."""
    from server.cli.deployment import build_release_fab
    from server.cli.deployment import verify_bundle as check

    result = check(Path(args.app), build_release_fab(Path(args.source)), published_hash=args.fab_hash)
    print(result.summary())
    return 0 if result.ok else 1
