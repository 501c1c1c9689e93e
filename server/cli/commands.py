"""Implementations of the `scdd` subcommands: CLI code, so it prints for the user (library code logs)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from server.cli.flags import UsageError
from shared.errors import ConfigError
from shared.io import write_h5ad, write_json, write_text

logger = logging.getLogger(__name__)


def _given(**values: Any) -> dict[str, Any]:
    """The flags the user gave: None means "the library's default", so the keyword is left out."""
    return {key: value for key, value in values.items() if value is not None}


def _check_run_config(overrides: Mapping[str, Any]) -> None:
    """Refuse run-config values (--set, flags) that the federation would refuse, before any work."""
    from server.cli.simulation import app_config_defaults
    from server.config import FederationConfig

    try:
        FederationConfig.from_run_config({**app_config_defaults(), **overrides})
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def check(args: argparse.Namespace) -> int:
    """`scdd check FILE`: validate a site's file against the data contract."""
    from shared.data import check_file
    from shared.protocol import SiteSpec

    label_key = args.label_key or SiteSpec().label_key  # the key a federation's sites read by default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report lists them once
        report = check_file(
            args.file,
            label_key=label_key,
            **_given(expect=args.expect, min_cells_per_class=args.min_cells_per_class),
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
        distill=DistillConfig(**_given(k=args.k, iterations=args.iterations, seed=args.seed)),
        pretrain_cfg=_pretrain_config(args.pretrain_steps, args.seed),
        **_given(
            label_key=args.label_key,
            expect=args.expect,
            n_genes=args.n_genes,
            embedding_key=args.embedding_key,
            seed=args.seed,
        ),
    )
    write_h5ad(out, report.synthetic)
    print(report.summary())
    print(f"wrote {out} ({report.synthetic.n_obs} cells x {report.synthetic.n_vars} genes)")
    return 0


def pretrain(args: argparse.Namespace) -> int:
    """`scdd pretrain REFERENCE.h5ad --label-key KEY --out DIR`: models for init-path / pretrained-path."""
    from server.reference import pretrain_reference

    out = pretrain_reference(
        args.file,
        args.out,
        label_key=args.label_key,
        cfg=_pretrain_config(args.pretrain_steps, args.seed),
        **_given(n_genes=args.n_genes, expect=args.expect),
    )
    info = json.loads((out / "reference.json").read_text(encoding="utf-8"))
    print(
        f"pretrained on {info['n_cells']} cells x {info['n_genes']} genes, {len(info['classes'])} classes "
        f"in {info['seconds']} s"
    )
    print(
        f"wrote {out}/plan.json, vae.pt, scdg.pt; use it with --set init-path={out} (FedAvg starts from it) "
        f"or pretrained-path={out} (no FedAvg; the sites' labels must be the reference's)"
    )
    return 0


def _pretrain_config(steps: tuple[int, ...] | None, seed: int | None):  # noqa: ANN202
    """PretrainConfig with optional (VAE, SCDG) step counts and seed (None: the library's)."""
    from dataclasses import replace

    from shared.pretrain import PretrainConfig

    pre = PretrainConfig(**_given(seed=seed))
    if not steps:
        return pre
    vae_steps, scdg_steps = (steps * 2)[:2]
    return replace(
        pre,
        vae=replace(pre.vae, steps=vae_steps, seed=pre.seed),
        scdg=replace(pre.scdg, steps=scdg_steps, seed=pre.seed),
    )


def _benchmark_config(args: argparse.Namespace):  # noqa: ANN202 - local import of the return type
    """The BenchmarkConfig of the flags; a value the benchmark refuses is a usage error (nothing has run yet)."""
    from server.bench.benchmark import PRETRAINING_MODE, BenchmarkConfig

    methods = args.methods or BenchmarkConfig().methods
    if args.pretraining:
        modes = set(args.pretraining) | {"none"}
        methods = tuple(m for m in methods if PRETRAINING_MODE.get(m, "none") in modes)
    try:
        return _make_benchmark_config(args, methods)
    except ValueError as exc:  # ConfigError included
        raise UsageError(str(exc)) from None


def _make_benchmark_config(args: argparse.Namespace, methods: tuple[str, ...]):  # noqa: ANN202
    from server.bench.benchmark import BenchmarkConfig, SplitConfig
    from server.cli.simulation import parse_overrides
    from shared.distill import DistillConfig

    return BenchmarkConfig(
        methods=methods,
        distill=DistillConfig(**_given(iterations=args.iterations)),
        pretrain=_pretrain_config(args.pretrain_steps, None),
        split=SplitConfig(
            **_given(label_key=args.label_key, site_key=args.site_key, n_sites=args.num_sites, n_genes=args.n_genes)
        ),
        federation=tuple(parse_overrides(args.overrides).items()),
        leave_out=args.leave_out or "",
        work_dir=args.work or "",
        **_given(
            ks=args.k,
            seeds=args.seeds,
            evaluators=args.evaluators,
            dm_iterations=args.dm_iterations,
            score_on=args.score_on,
        ),
    )


def _ticker(bar: Any) -> Callable[[str], None]:
    """A progress callback that moves a tqdm bar one step and shows the message."""

    def step(msg: str) -> None:
        bar.set_postfix_str(msg)
        bar.update(1)

    return step


def benchmark(args: argparse.Namespace) -> int:
    """`scdd benchmark FILE...`: every method at every k, results.md + results.json per dataset."""
    from dataclasses import asdict

    from tqdm.auto import tqdm

    from server.bench import benchmark as bm
    from server.cli.simulation import app_config_defaults
    from server.config import FederationConfig
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
            cells, per_seed = bm.run(path, work, progress=_ticker(bar))
        seeds: list[dict[str, Any]] = per_seed  # each seed's summary (SeedRun.summary)
        scored = (
            f"the {cfg.score_on.upper()} cells of the left-out site {cfg.leave_out}, "
            "which took no part in pretraining or codes"
            if cfg.leave_out
            else f"the pooled {cfg.score_on.upper()} cells of all sites"
        )
        header = (
            f"{len(seeds[0]['sites'])} sites ({', '.join(seeds[0]['sites'])}), {seeds[0]['n_genes']} genes, "
            f"{seeds[0]['n_classes']} classes; {cfg.seeds} seeds (each re-draws the site split where Dirichlet, "
            "the per-site train / validation / test split, pretraining and distillation; "
            f"split hashes {', '.join(str(s['split_hash']) for s in seeds)}); scored on {scored}. "
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
            earlier = old.get("merged") or {}
            kept_methods = sorted({r["method"] for r in kept})
            merged_from = {
                "rerun_methods": list(cfg.methods),
                "kept_methods": kept_methods,
                "kept_wall_seconds": old.get("wall_seconds"),
                # methods an earlier --merge reran whose rows are kept: the header keeps saying so
                "earlier_reruns": sorted(
                    {*earlier.get("rerun_methods", []), *earlier.get("earlier_reruns", [])} & set(kept_methods)
                ),
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
            # shared.audit since the class-mix correction (results without this key predate it)
            "audit": "class-matched",
            "mlp": asdict(cfg.mlp),
            "split": asdict(cfg.split),
            "scdd_decode_mode": FederationConfig.from_run_config(
                {**app_config_defaults(), **cfg.overrides()}
            ).resolved_decode_mode,
            "python": platform.python_version(),
            "seeds": cfg.seeds,
        }
        if merged_from:
            result["merged"] = merged_from
            header += (
                f" Rows of {', '.join(cfg.methods)} rerun with this version and merged into the earlier results "
                "(--merge)."
            )
            if merged_from["earlier_reruns"]:
                header += f" Rows of {', '.join(merged_from['earlier_reruns'])} came from an earlier such rerun."
        write_json(out / name / "results.json", result)
        pre = "; ".join(
            f"seed {s['seed']}: VAE {s['pooled_pretrain_seconds']['vae']:.1f} s, "
            f"SCDG {s['pooled_pretrain_seconds']['scdg']:.1f} s"
            for s in seeds
            if s["pooled_pretrain_seconds"]
        )
        md = bm.markdown(name, rows, cfg.ks, header + (f" Pooled pretraining: {pre}." if pre else ""))
        write_text(out / name / "results.md", md)
        summary[name] = rows
        print(md)
    if args.merge and (out / "summary.json").is_file():  # the other datasets' rows stay
        summary = {**json.loads((out / "summary.json").read_text(encoding="utf-8")), **summary}
    write_json(out / "summary.json", summary)
    print(f"wrote {out}/<dataset>/results.md and results.json")
    return 0


def _outputs(run_dir: Path) -> None:
    for name in ("report.html", "synthetic.h5ad", "metrics.json"):
        if (run_dir / name).is_file():
            print(f"{name:>15}: {run_dir / name}")


def simulate_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The run-config keys `scdd simulate`'s flags set (none given: the run config's own defaults), then --set."""
    from server.cli.simulation import parse_overrides

    flags = {
        "sim-site-key": args.site_key,
        "label-key": args.label_key,
        "cells-per-class": args.k,
        "num-distill-rounds": args.rounds,
        "sim-num-sites": args.num_sites,
        "device": args.device,
    }
    return _given(**flags) | parse_overrides(args.overrides)


def simulate(args: argparse.Namespace) -> int:
    """`scdd simulate FILE --out DIR`: the federation in this process (no Ray), one fake node per site."""
    from server.cli.simulation import simulate_file

    overrides = simulate_overrides(args)
    _check_run_config(overrides)
    if "device" in overrides:  # the sites run in this process: a GPU they cannot see is refused now, not mid-run
        from shared.device import resolve_device

        resolve_device(str(overrides["device"]))
    t0 = time.perf_counter()
    run_dir = simulate_file(Path(args.file), out=Path(args.out), overrides=overrides)
    print(f"federated run finished in {time.perf_counter() - t0:.1f} s")
    _outputs(run_dir)
    return 0


def demo(args: argparse.Namespace) -> int:
    """`scdd demo`: the real Flower simulation (flwr run, Ray) on the bundled data; non-zero unless it completed."""
    import sys

    from server.cli.demo import DemoFailed, run_demo
    from server.cli.simulation import parse_overrides

    overrides = parse_overrides(args.overrides)
    _check_run_config(overrides)
    try:
        result = run_demo(Path(args.out), overrides=overrides, echo=print, **_given(timeout_s=args.timeout))
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
    """`scdd flwr-connection [NAME] --address HOST:PORT --root-certificates ca.crt`: merge it into flwr's config."""
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
    from server.cli.deployment import BundleError, build_release_fab
    from server.cli.deployment import verify_bundle as check

    app = Path(args.app).expanduser().resolve()
    if not app.is_dir():  # before the release's FAB is rebuilt (seconds)
        msg = f"{app} is not a directory: give the app folder under the SuperNode's $FLWR_HOME/apps/"
        raise BundleError(msg)
    result = check(app, build_release_fab(Path(args.source)), **_given(published_hash=args.fab_hash))
    print(result.summary())
    return 0 if result.ok else 1
