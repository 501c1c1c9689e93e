"""`scdd`: the command line of fedscdd (checks, single-site distillation, benchmark, federation, certs)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from shared.errors import FedscddError

logger = logging.getLogger(__name__)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        msg = f"expected comma-separated integers like 1,10,50, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not values or min(values) < 1:
        msg = f"expected positive integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return values


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate a site's .h5ad before joining a federation")
    p.add_argument("file")
    p.add_argument("--label-key", default="cell_type")
    p.add_argument(
        "--expect", choices=["auto", "counts", "lognorm"], default="auto", help="what X should hold (default: detect)"
    )
    p.add_argument("--min-cells-per-class", type=int, default=2)


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="single site, no federation: .h5ad in, synthetic .h5ad out")
    p.add_argument("file")
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--expect", choices=["auto", "counts", "lognorm"], default="auto")
    p.add_argument("--k", type=int, default=10, help="codes (synthetic cells) per class")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--pretrain-steps", type=_ints, default=None, help="VAE,SCDG pretraining steps (default 1000,1500)")
    p.add_argument(
        "--embedding-key",
        default=None,
        help="obsm key of an external foundation-model embedding to align the latent space with",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="synthetic .h5ad to write")


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="train the VAE + SCDG on a public reference .h5ad (for init-path or pretrained-path)"
    )
    p.add_argument("file", help="the reference .h5ad (public data: it is not a member of any site)")
    p.add_argument(
        "--label-key", required=True, help="obs column with the reference's cell types (need not match the sites')"
    )
    p.add_argument("--expect", choices=["auto", "counts", "lognorm"], default="auto")
    p.add_argument(
        "--n-genes",
        type=int,
        default=2000,
        help="variable genes kept (a plan using init-path picks its genes among these)",
    )
    p.add_argument("--pretrain-steps", type=_ints, default=None, help="VAE,SCDG steps (default: PretrainConfig's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory to write plan.json, vae.pt, scdg.pt, reference.json")


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark", help="benchmark: the shipped federation (in-process) against baselines, on held-out real cells"
    )
    p.add_argument("files", nargs="+")
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--site-key", default="batch", help="obs column naming sites; absent -> Dirichlet split")
    p.add_argument("--sites", type=int, default=3, help="sites for the Dirichlet(0.5) split")
    p.add_argument("--k", type=_ints, default=(1, 10, 50))
    p.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="each seed re-draws the Dirichlet site split, the per-site splits, pretraining and distillation",
    )
    p.add_argument(
        "--score-on",
        choices=("test", "val"),
        default="test",
        help="cells the numbers are scored on: test (report) or val (tuning)",
    )
    p.add_argument("--methods", default=None, help="comma-separated subset of methods")
    p.add_argument("--evaluators", default="mlp,logreg,knn")
    p.add_argument(
        "--iterations", type=int, default=-1, help="scdd distillation iterations (default: by k, as in a federation)"
    )
    p.add_argument("--dm-iterations", type=int, default=500)
    p.add_argument(
        "--pretrain-steps", type=_ints, default=None, help="VAE,SCDG pretraining steps (default: PretrainConfig's)"
    )
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--out", required=True, help="output directory (results.md, results.json)")
    p.add_argument(
        "--pretraining",
        default="fedavg,pooled",
        help="scdd rows to run: fedavg (the shipped federation: scdd, scdd_noopt), pooled (scdd_pooled, an upper bound), or both",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config key for the federated rows (repeatable), as in `scdd simulate --set`",
    )
    p.add_argument(
        "--leave-out",
        default=None,
        metavar="SITE",
        help="a site that takes no part; every method is scored on its cells only",
    )
    p.add_argument(
        "--work", default=None, help="keep the federated runs under this folder (default: a temporary folder, removed)"
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of methods not run this time from an existing results.json (rerun one method only)",
    )


def _add_federation(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="a federation from one file split into sites, in this process (no Ray)")
    p.add_argument("--data", required=True, help=".h5ad shared out to the simulated sites")
    p.add_argument(
        "--site-key", default="batch", help="obs column naming sites; absent -> Dirichlet(0.5) label-skew split"
    )
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--k", type=int, default=10, help="codes (synthetic cells) per class per site")
    p.add_argument(
        "--rounds", type=int, default=None, help="distillation rounds (default: num-distill-rounds of the app config)"
    )
    p.add_argument("--num-sites", type=int, default=3, help="sites of the Dirichlet split")
    p.add_argument(
        "--device",
        default=None,
        help="where the sites' models run: cpu (default), auto (a GPU when there is one), cuda, cuda:N",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any run-config key (repeatable), e.g. --set vae-local-steps=200",
    )
    p.add_argument(
        "--out",
        required=True,
        help="run directory to write (config.json, metrics.json, synthetic.h5ad, report.html, ...)",
    )
    p = sub.add_parser("demo", help="the real Flower simulation (flwr run, Ray) on the bundled example data")
    p.add_argument("--out", default="runs/demo", help="run directory (Flower's state goes to <out>/.flwr)")
    p.add_argument(
        "--timeout", type=float, default=900.0, help="seconds before the run is stopped and reported as failed"
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="extra run-config values"
    )
    p = sub.add_parser("report", help="(re)write report.html of a run directory")
    p.add_argument("run_dir")


def _add_deployment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flwr-connection",
        help="coordinator: add the TLS SuperLink connection to $FLWR_HOME/config.toml (merged, made the default)",
    )
    p.add_argument(
        "name", nargs="?", default="fedscdd", help="connection name used in flwr commands (default: fedscdd)"
    )
    p.add_argument(
        "--address", required=True, help="HOST:PORT of the SuperLink, the host a SAN of server.pem (e.g. 10.0.0.5:8000)"
    )
    p.add_argument("--root-certificates", required=True, help="the federation's ca.crt (stored as an absolute path)")
    p.add_argument("--no-default", action="store_true", help="keep flwr's current default connection")
    p = sub.add_parser(
        "verify-bundle", help="site: check that the app a SuperNode installed is exactly the release's code"
    )
    p.add_argument(
        "app",
        help="the installed app folder ($FLWR_HOME/apps/fedscdd.fedscdd.<version>.<hash8>), or the SuperNode's FLWR_HOME",
    )
    p.add_argument(
        "--source", required=True, help="a clean checkout of the release tag (its FAB is rebuilt with flwr build)"
    )
    p.add_argument(
        "--fab-hash", default="", help="the run's fab-hash the coordinator published (optional): must be the release's"
    )


def build_parser() -> argparse.ArgumentParser:
    """The `scdd` argument parser."""
    parser = argparse.ArgumentParser(prog="scdd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_check(sub)
    _add_distill(sub)
    _add_pretrain(sub)
    _add_benchmark(sub)
    _add_federation(sub)
    _add_deployment(sub)
    sub.add_parser("certs", help="CA, SuperLink certificate and site keys (see `scdd certs --help`)", add_help=False)
    return parser


def _run(args: argparse.Namespace) -> int:
    from server.cli import commands

    return int(getattr(commands, args.command.replace("-", "_"))(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `scdd` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["certs"]:
        from server.pki.cli import main as certs_main

        return certs_main(argv[1:])
    args = build_parser().parse_args(argv)
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
    except FedscddError as exc:
        print(f"scdd {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"scdd {args.command}: interrupted", file=sys.stderr)
        return 130
