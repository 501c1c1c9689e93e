"""`scdd`: the command line of fedscdd (checks, single-site distillation, benchmark, federation, certs).

One convention for every subcommand:

- inputs are positional (``scdd check FILE``, ``scdd simulate FILE --out DIR``); the same thing has the same
  flag everywhere (``--label-key``, ``--site-key``, ``--num-sites``, ``--k``, ``--n-genes``, ``--seed``, ...);
- a flag the library has a default for defaults to None ("the library's default") and its help shows the
  library's value, read from the dataclass or function it reaches when --help is shown (never restated here);
- every bad value is refused in ONE line on stderr, ``scdd <command>: error: <what, what is expected>``:
  by the parser, before any data is read (exit 2: syntax, ranges, unknown names, missing input files; the line
  ends ``see `scdd <command> --help```), or by the library for what only it can judge (a column of the data, a
  certificate, a SuperLink address; exit 1). No traceback either way.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from server.cli import flags
from shared.errors import FedscddError

logger = logging.getLogger(__name__)

DESCRIPTION = "The command line of fedscdd: checks, single-site distillation, benchmark, federation, certs."
EXAMPLE = "shared/example_data/kang_pbmc_muscat.h5ad"  # the bundled example, as the --help examples name it
RENAMED = {  # flags that were removed or renamed: an unknown-argument error names the new spelling
    "--sites": "--sites is now --num-sites",
    "--data": "--data is gone: give the .h5ad as the first argument (scdd simulate FILE --out DIR)",
}


# --------------------------------------------------------------------------- subcommands


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = flags.command(
        sub,
        "check",
        "validate a site's .h5ad before joining a federation",
        f"scdd check {EXAMPLE} --label-key cell_type",
    )
    p.add_argument("file", type=flags.h5ad_in, help="the site's .h5ad")
    flags.label_key(p, flags.field("shared.protocol", "SiteSpec", "label_key"))
    flags.expect(p, flags.param("shared.data", "check_file", "expect"))
    flags.add(
        p,
        "--min-cells-per-class",
        type=flags.int_arg(1),
        library=flags.param("shared.data", "check_file", "min_cells_per_class"),
        help="classes with fewer cells are reported",
    )


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = flags.command(
        sub,
        "distill",
        "single site, no federation: .h5ad in, synthetic .h5ad out",
        f"scdd distill {EXAMPLE} --label-key cell_type --k 10 --out runs/kang-synthetic.h5ad",
        f"scdd distill {EXAMPLE} --label-key cell_type --k 1 --pretrain-steps 500,500 --out runs/kang-k1.h5ad",
    )
    single = "server.cli.single_site"
    p.add_argument("file", type=flags.h5ad_in, help="the site's .h5ad")
    flags.label_key(p, flags.param(single, "distill_file", "label_key"))
    flags.expect(p, flags.param(single, "distill_file", "expect"))
    flags.codes_per_class(p, flags.field("shared.distill", "DistillConfig", "k"), "codes per class")
    flags.add(p, "--iterations", type=flags.int_arg(0), library=flags.iterations, help="distillation iterations")
    flags.n_genes(p, flags.param(single, "distill_file", "n_genes"))
    flags.pretrain_steps_flag(p)
    flags.add(
        p,
        "--embedding-key",
        type=flags.name,
        help="obsm key of an external foundation-model embedding to align the latent space with (optional)",
    )
    flags.seed(p, flags.param(single, "distill_file", "seed"))
    p.add_argument("--out", required=True, type=flags.h5ad_out, help="synthetic .h5ad to write")


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = flags.command(
        sub,
        "pretrain",
        "train the VAE + SCDG on a public reference .h5ad (for init-path or pretrained-path)",
        f"scdd pretrain {EXAMPLE} --label-key cell_type --out runs/kang-reference",
    )
    p.add_argument("file", type=flags.h5ad_in, help="the reference .h5ad (public data: it is not a member of any site)")
    flags.label_key(p, None, required=True)
    flags.expect(p, flags.param("server.reference", "pretrain_reference", "expect"))
    flags.n_genes(
        p,
        flags.param("server.reference", "pretrain_reference", "n_genes"),
        "variable genes kept (a plan using init-path picks its genes among these)",
    )
    flags.pretrain_steps_flag(p)
    flags.seed(p, flags.field("shared.pretrain", "PretrainConfig", "seed"))
    p.add_argument(
        "--out", required=True, type=flags.out_dir, help="directory to write plan.json, vae.pt, scdg.pt, reference.json"
    )


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = flags.command(
        sub,
        "benchmark",
        "benchmark: the shipped federation (in-process) against baselines, on held-out real cells",
        f"scdd benchmark {EXAMPLE} --label-key cell_type --site-key batch --methods random,centralized --k 1,10 "
        "--seeds 1 --out runs/bench",
        f"scdd benchmark {EXAMPLE} --label-key cell_type --site-key batch --leave-out stim107 --out runs/bench-loo",
    )
    bench = "server.bench.benchmark"
    p.add_argument("files", nargs="+", type=flags.h5ad_in, metavar="file", help="one .h5ad per dataset")
    flags.label_key(p, flags.field(bench, "SplitConfig", "label_key"))
    flags.site_key(p, flags.field(bench, "SplitConfig", "site_key"))
    flags.num_sites(p, flags.field(bench, "SplitConfig", "n_sites"))
    flags.add(
        p,
        "--k",
        type=flags.ks,
        library=flags.field(bench, "BenchmarkConfig", "ks"),
        help="codes per class, comma-separated",
    )
    flags.add(
        p,
        "--seeds",
        type=flags.int_arg(1),
        library=flags.field(bench, "BenchmarkConfig", "seeds"),
        help="how many seeds (0..N-1); each re-draws the Dirichlet site split, the per-site splits, pretraining "
        "and distillation",
    )
    flags.add(
        p,
        "--score-on",
        choices=("test", "val"),
        library=flags.field(bench, "BenchmarkConfig", "score_on"),
        help="cells the numbers are scored on: test (report) or val (tuning)",
    )
    flags.add(
        p,
        "--methods",
        type=flags.methods,
        library=flags.field(bench, "BenchmarkConfig", "methods"),
        help="comma-separated methods",
    )
    flags.add(
        p,
        "--evaluators",
        type=flags.evaluators,
        library=flags.field(bench, "BenchmarkConfig", "evaluators"),
        help="comma-separated evaluators",
    )
    flags.add(p, "--iterations", type=flags.int_arg(0), library=flags.iterations, help="scdd distillation iterations")
    flags.add(
        p,
        "--dm-iterations",
        type=flags.int_arg(0),
        library=flags.field(bench, "BenchmarkConfig", "dm_iterations"),
        help="iterations of the distribution-matching baseline (dm)",
    )
    flags.pretrain_steps_flag(p)
    flags.n_genes(p, flags.field(bench, "SplitConfig", "n_genes"))
    p.add_argument("--out", required=True, type=flags.out_dir, help="output directory (results.md, results.json)")
    flags.add(
        p,
        "--pretraining",
        type=flags.pretraining,
        library=flags.pretraining_modes,
        help="scdd rows to run: fedavg (the shipped federation: scdd, scdd_noopt), pooled (scdd_pooled, an upper "
        "bound), or both",
    )
    flags.overrides(p, "run-config key for the federated rows (repeatable), as in `scdd simulate --set`")
    p.add_argument(
        "--leave-out",
        type=flags.name,
        metavar="SITE",
        help="a site that takes no part; every method is scored on its cells only",
    )
    p.add_argument(
        "--work",
        type=flags.out_dir,
        help="keep the federated runs under this folder (without it: a temporary one, removed)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of methods not run this time from an existing results.json (rerun one method only)",
    )


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = flags.command(
        sub,
        "simulate",
        "a federation from one file split into sites, in this process (no Ray)",
        f"scdd simulate {EXAMPLE} --label-key cell_type --site-key batch --k 10 --out runs/kang-sim",
        f"scdd simulate {EXAMPLE} --label-key cell_type --site-key batch --set dp-epsilon=8 --out runs/kang-dp",
    )
    fed = "server.config"
    p.add_argument("file", type=flags.h5ad_in, help=".h5ad shared out to the simulated sites")
    flags.site_key(p, flags.field(fed, "FederationConfig", "sim_site_key"))
    flags.label_key(p, flags.field(fed, "FederationConfig", "label_key"))
    flags.codes_per_class(p, flags.field(fed, "FederationConfig", "cells_per_class"), "codes per class per site")
    flags.add(
        p,
        "--rounds",
        type=flags.int_arg(1),
        library=flags.field(fed, "FederationConfig", "num_distill_rounds"),
        help="distillation rounds",
    )
    flags.num_sites(p, flags.field(fed, "FederationConfig", "sim_num_sites"))
    flags.add(
        p,
        "--device",
        type=flags.device,
        library=flags.field(fed, "FederationConfig", "device"),
        help="where the sites' models run: cpu, auto (a GPU when there is one), cuda, cuda:N",
    )
    flags.overrides(p, "any run-config key (repeatable), e.g. --set vae-local-steps=200")
    p.add_argument(
        "--out",
        required=True,
        type=flags.out_dir,
        help="run directory to write (config.json, metrics.json, synthetic.h5ad, report.html, ...)",
    )


def _add_runs(sub: argparse._SubParsersAction) -> None:
    p = flags.command(
        sub,
        "demo",
        "the real Flower simulation (flwr run, Ray) on the bundled example data, with 10 pretraining rounds "
        "(the default run config has 30: --set num-pretrain-rounds=30)",
        "scdd demo --out runs/demo",
        "scdd demo --out runs/demo-default --set num-pretrain-rounds=30",
    )
    p.add_argument(
        "--out",
        default="runs/demo",
        type=flags.out_dir,
        help="run directory, Flower's state in <out>/.flwr (default: %(default)s)",
    )
    flags.add(
        p,
        "--timeout",
        type=flags.positive_float,
        library=flags.param("server.cli.demo", "run_demo", "timeout_s"),
        help="seconds before the run is stopped and reported as failed",
    )
    flags.overrides(p, "extra run-config values (repeatable)")
    p = flags.command(sub, "report", "(re)write report.html of a run directory", "scdd report runs/kang-sim")
    p.add_argument("run_dir", help="the directory of a completed run (out-dir/<run-id>)")


def _add_deployment(sub: argparse._SubParsersAction) -> None:
    p = flags.command(
        sub,
        "flwr-connection",
        "coordinator: add the TLS SuperLink connection to $FLWR_HOME/config.toml (merged, made the default)",
        "scdd flwr-connection fedscdd --address 10.0.0.5:8000 --root-certificates certs/ca.crt",
    )
    p.add_argument(
        "name", nargs="?", default="fedscdd", help="connection name used in flwr commands (default: %(default)s)"
    )
    p.add_argument(
        "--address", required=True, help="HOST:PORT of the SuperLink, the host a SAN of server.pem (e.g. 10.0.0.5:8000)"
    )
    p.add_argument("--root-certificates", required=True, help="the federation's ca.crt (stored as an absolute path)")
    p.add_argument("--no-default", action="store_true", help="keep flwr's current default connection")
    p = flags.command(
        sub,
        "verify-bundle",
        "site: check that the app a SuperNode installed is exactly the release's code",
        "scdd verify-bundle /var/lib/fedscdd/supernode --source /opt/fedscdd/src",
    )
    p.add_argument(
        "app",
        help="the installed app folder ($FLWR_HOME/apps/fedscdd.fedscdd.<version>.<hash8>), "
        "or the SuperNode's FLWR_HOME",
    )
    p.add_argument(
        "--source", required=True, help="a clean checkout of the release tag (its FAB is rebuilt with flwr build)"
    )
    p.add_argument(
        "--fab-hash",
        type=flags.fab_hash,
        help="the run's fab-hash the coordinator published (optional): must be the release's",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `scdd` argument parser (`scdd certs` has its own: server.pki.cli.build_parser)."""
    parser = flags.Parser(prog="scdd", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_check(sub)
    _add_distill(sub)
    _add_pretrain(sub)
    _add_benchmark(sub)
    _add_simulate(sub)
    _add_runs(sub)
    _add_deployment(sub)
    sub.add_parser("certs", help="CA, SuperLink certificate and site keys (see `scdd certs --help`)", add_help=False)
    return parser


def subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The parser of ``command`` (``parser`` itself when there is none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; an unknown argument is refused by the subcommand's parser, naming a renamed flag's new form."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        hints = [RENAMED[a.split("=")[0]] for a in extra if a.split("=")[0] in RENAMED]
        message = f"unrecognized arguments: {' '.join(extra)}" + "".join(f"; {h}" for h in hints)
        subparser(parser, getattr(args, "command", None)).error(message)
    return args


def _run(args: argparse.Namespace) -> int:
    from server.cli import commands

    return int(getattr(commands, args.command.replace("-", "_"))(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `scdd` console script; returns the exit status (2: a refused flag value)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["certs"]:
        from server.pki.cli import main as certs_main

        return certs_main(argv[1:])
    try:
        args = parse(build_parser(), argv)
    except SystemExit as exc:  # --help, or a refused value (its line already printed)
        return flags.exit_code(exc)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("numba", "matplotlib", "h5py", "flwr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        return _run(args)
    except flags.UsageError as exc:
        print(
            f"scdd {args.command}: error: {flags.one_line(str(exc))}; see `scdd {args.command} --help`", file=sys.stderr
        )
        return 2
    except FedscddError as exc:
        print(f"scdd {args.command}: error: {flags.one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"scdd {args.command}: interrupted", file=sys.stderr)
        return 130
