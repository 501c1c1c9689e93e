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
import difflib
import importlib
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from shared.errors import ConfigError, FedscddError

logger = logging.getLogger(__name__)

DESCRIPTION = "The command line of fedscdd: checks, single-site distillation, benchmark, federation, certs."
EXAMPLE = "shared/example_data/kang_pbmc_muscat.h5ad"  # the bundled example, as the --help examples name it
RENAMED = {  # flags that were removed or renamed: an unknown-argument error names the new spelling
    "--sites": "--sites is now --num-sites",
    "--data": "--data is gone: give the .h5ad as the first argument (scdd simulate FILE --out DIR)",
}
LibraryDefault = Callable[[], object]


class UsageError(ConfigError):
    """A flag value refused after parsing, before any work (exit 2, like the parser's own refusals)."""


def one_line(message: str) -> str:
    """``message`` on one line (the error format of every subcommand)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' lines; appends "(default: X)" read from the library when the help is shown."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        source: LibraryDefault | None = getattr(action, "library_default", None)
        if source is not None:
            shown = show_default(source()).replace("%", "%%")
            text = f"{text} (default: {shown})" if text else f"default: {shown}"
        return text


class Parser(argparse.ArgumentParser):
    """argparse whose every refusal is one line: ``<prog>: error: <message>; see `<prog> --help```, exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print the one-line refusal and exit 2."""
        self.exit(2, f"{self.prog}: error: {one_line(message)}; see `{self.prog} --help`\n")


def exit_code(exc: SystemExit) -> int:
    """The status a SystemExit (from --help or a refusal) carries."""
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


def show_default(value: object) -> str:
    """A default as the command line writes it (tuples comma-separated)."""
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value)


# --------------------------------------------------------------------------- values (argparse `type=` functions)


def _refuse(expected: str, text: str) -> NoReturn:
    raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")


def int_arg(minimum: int) -> Callable[[str], int]:
    """A whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            _refuse(f"a whole number >= {minimum}", text)
        if value < minimum:
            _refuse(f"a whole number >= {minimum}", text)
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        _refuse("a number of seconds > 0 (e.g. 600)", text)
    if not value > 0 or value == float("inf"):
        _refuse("a number of seconds > 0 (e.g. 600)", text)
    return value


def _int_list(text: str, expected: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        _refuse(expected, text)
    if not values or min(values) < 1:
        _refuse(expected, text)
    return values


def _ks(text: str) -> tuple[int, ...]:
    return _int_list(text, "comma-separated whole numbers >= 1, like 1,10,50")


def _steps(text: str) -> tuple[int, ...]:
    values = _int_list(text, "VAE,SCDG step counts >= 1 like 2000,1000 (or one number for both)")
    if len(values) > 2:
        _refuse("VAE,SCDG step counts >= 1 like 2000,1000 (or one number for both)", text)
    return values


def _name(text: str) -> str:
    if not text.strip():
        _refuse("a non-empty name", text)
    return text


def h5ad_in(text: str) -> str:
    """An existing .h5ad file to read."""
    if Path(text).suffix.lower() != ".h5ad":
        _refuse("an AnnData .h5ad file (write one with adata.write_h5ad)", text)
    if not Path(text).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}; give the path of an existing .h5ad")
    return text


def _h5ad_out(text: str) -> str:
    if Path(text).suffix.lower() != ".h5ad":
        _refuse("a .h5ad file name to write (e.g. synthetic.h5ad)", text)
    if Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a .h5ad file name to write")
    return text


def out_dir(text: str) -> str:
    """A directory to write into (created when absent); refuses an existing file."""
    if not text.strip():
        _refuse("a directory to write into", text)
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is an existing file; give a new or existing directory")
    return text


def _subset(text: str, known: Sequence[str], what: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        got = f"unknown {what} {', '.join(repr(n) for n in unknown)}" if unknown else f"no {what} in {text!r}"
        raise argparse.ArgumentTypeError(f"{got}; expected a comma-separated subset of {','.join(known)}")
    return names


def _methods(text: str) -> tuple[str, ...]:
    from server.bench.benchmark import METHODS

    return _subset(text, METHODS, "methods")


def _evaluators(text: str) -> tuple[str, ...]:
    from shared.evaluation import EVALUATORS

    return _subset(text, EVALUATORS, "evaluators")


def _pretraining(text: str) -> tuple[str, ...]:
    return _subset(text, _pretraining_modes(), "pretraining modes")


def run_config_item(text: str) -> str:
    """``KEY=VALUE`` with a known run-config key (the value is judged with the whole config, after parsing)."""
    key, sep, _ = text.partition("=")
    key = key.strip()
    if not sep or not key:
        _refuse("KEY=VALUE like vae-local-steps=200", text)
    from server.config import FederationConfig

    known = FederationConfig.keys()
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        msg = f"unknown run-config key {key!r}; {hint}known keys: {', '.join(known)}"
        raise argparse.ArgumentTypeError(msg)
    return text


def _device(text: str) -> str:
    from shared.device import check_device

    try:
        check_device(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _fab_hash(text: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text.strip()):
        _refuse("the 64 hex digits of the run's fab-hash (as the coordinator published it)", text)
    return text.strip()


# --------------------------------------------------------------------------- library defaults (read for --help)


def _field(module: str, cls: str, name: str) -> LibraryDefault:
    """The default of field ``name`` of the library dataclass ``module.cls``."""
    return lambda: getattr(getattr(importlib.import_module(module), cls)(), name)


def _param(module: str, func: str, name: str) -> LibraryDefault:
    """The default of parameter ``name`` of the library function ``module.func``."""
    return lambda: inspect.signature(getattr(importlib.import_module(module), func)).parameters[name].default


def _pretrain_steps() -> str:
    from shared.pretrain import PretrainConfig

    cfg = PretrainConfig()
    return f"{cfg.vae.steps},{cfg.scdg.steps}"


def _iterations() -> object:
    from server.bench.benchmark import BenchmarkConfig
    from shared.distill import DistillConfig, resolve_iterations

    fixed = DistillConfig().iterations
    if fixed is not None and fixed >= 0:
        return fixed
    by_k = ", ".join(f"k={k}: {resolve_iterations(DistillConfig(k=k))}" for k in BenchmarkConfig().ks)
    return f"by k as in a federation, {by_k}"


def _pretraining_modes() -> tuple[str, ...]:
    from server.bench.benchmark import PRETRAINING_MODE

    return tuple(sorted(set(PRETRAINING_MODE.values())))


# --------------------------------------------------------------------------- flags (one helper per shared flag)


def _add(p: argparse.ArgumentParser, *flags: str, library: LibraryDefault | None = None, **kw: Any) -> None:
    action = p.add_argument(*flags, **kw)
    if library is not None:
        action.library_default = library  # type: ignore[attr-defined]  # read by HelpFormatter


def _epilog(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _label_key(p: argparse.ArgumentParser, library: LibraryDefault | None, **kw: Any) -> None:
    _add(p, "--label-key", type=_name, library=library, help="obs column with the cell types", **kw)


def _site_key(p: argparse.ArgumentParser, library: LibraryDefault) -> None:
    help_text = "obs column naming the sites; absent from obs (or '') -> a Dirichlet(0.5) label-skew split"
    _add(p, "--site-key", library=library, help=help_text)


def _num_sites(p: argparse.ArgumentParser, library: LibraryDefault) -> None:
    help_text = "sites of the Dirichlet split (when the site key is not in obs)"
    _add(p, "--num-sites", type=int_arg(1), library=library, help=help_text)


def _expect(p: argparse.ArgumentParser, library: LibraryDefault) -> None:
    help_text = "what X holds: raw counts, log-normalised values, or auto (detected)"
    _add(p, "--expect", choices=["auto", "counts", "lognorm"], library=library, help=help_text)


def _n_genes(p: argparse.ArgumentParser, library: LibraryDefault, text: str = "variable genes kept") -> None:
    _add(p, "--n-genes", type=int_arg(10), library=library, help=text)


def _pretrain_steps_flag(p: argparse.ArgumentParser) -> None:
    help_text = "VAE,SCDG pretraining steps (one number: both)"
    _add(p, "--pretrain-steps", type=_steps, library=_pretrain_steps, help=help_text)


def _seed(p: argparse.ArgumentParser, library: LibraryDefault) -> None:
    _add(p, "--seed", type=int_arg(0), library=library, help="random seed of splits, pretraining and distillation")


def _overrides(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], type=run_config_item, metavar="KEY=VALUE", help=text
    )


# --------------------------------------------------------------------------- subcommands


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="validate a site's .h5ad before joining a federation",
        epilog=_epilog(f"scdd check {EXAMPLE} --label-key cell_type"),
    )
    p.add_argument("file", type=h5ad_in, help="the site's .h5ad")
    _label_key(p, _field("shared.protocol", "SiteSpec", "label_key"))
    _expect(p, _param("shared.data", "check_file", "expect"))
    _add(
        p,
        "--min-cells-per-class",
        type=int_arg(1),
        library=_param("shared.data", "check_file", "min_cells_per_class"),
        help="classes with fewer cells are reported",
    )


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="single site, no federation: .h5ad in, synthetic .h5ad out",
        epilog=_epilog(
            f"scdd distill {EXAMPLE} --label-key cell_type --k 10 --out runs/kang-synthetic.h5ad",
            f"scdd distill {EXAMPLE} --label-key cell_type --k 1 --pretrain-steps 500,500 --out runs/kang-k1.h5ad",
        ),
    )
    single = "server.cli.single_site"
    p.add_argument("file", type=h5ad_in, help="the site's .h5ad")
    _label_key(p, _param(single, "distill_file", "label_key"))
    _expect(p, _param(single, "distill_file", "expect"))
    _add(p, "--k", type=int_arg(1), library=_field("shared.distill", "DistillConfig", "k"), help="codes per class")
    _add(p, "--iterations", type=int_arg(0), library=_iterations, help="distillation iterations")
    _n_genes(p, _param(single, "distill_file", "n_genes"))
    _pretrain_steps_flag(p)
    _add(
        p,
        "--embedding-key",
        type=_name,
        help="obsm key of an external foundation-model embedding to align the latent space with (optional)",
    )
    _seed(p, _param(single, "distill_file", "seed"))
    p.add_argument("--out", required=True, type=_h5ad_out, help="synthetic .h5ad to write")


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="train the VAE + SCDG on a public reference .h5ad (for init-path or pretrained-path)",
        epilog=_epilog(f"scdd pretrain {EXAMPLE} --label-key cell_type --out runs/kang-reference"),
    )
    p.add_argument("file", type=h5ad_in, help="the reference .h5ad (public data: it is not a member of any site)")
    _label_key(p, None, required=True)
    _expect(p, _param("server.reference", "pretrain_reference", "expect"))
    _n_genes(
        p,
        _param("server.reference", "pretrain_reference", "n_genes"),
        "variable genes kept (a plan using init-path picks its genes among these)",
    )
    _pretrain_steps_flag(p)
    _seed(p, _field("shared.pretrain", "PretrainConfig", "seed"))
    p.add_argument(
        "--out", required=True, type=out_dir, help="directory to write plan.json, vae.pt, scdg.pt, reference.json"
    )


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark",
        help="benchmark: the shipped federation (in-process) against baselines, on held-out real cells",
        epilog=_epilog(
            f"scdd benchmark {EXAMPLE} --label-key cell_type --site-key batch --methods random,centralized --k 1,10 "
            "--seeds 1 --out runs/bench",
            f"scdd benchmark {EXAMPLE} --label-key cell_type --site-key batch --leave-out stim107 --out runs/bench-loo",
        ),
    )
    bench = "server.bench.benchmark"
    p.add_argument("files", nargs="+", type=h5ad_in, metavar="file", help="one .h5ad per dataset")
    _label_key(p, _field(bench, "SplitConfig", "label_key"))
    _site_key(p, _field(bench, "SplitConfig", "site_key"))
    _num_sites(p, _field(bench, "SplitConfig", "n_sites"))
    _add(p, "--k", type=_ks, library=_field(bench, "BenchmarkConfig", "ks"), help="codes per class, comma-separated")
    _add(
        p,
        "--seeds",
        type=int_arg(1),
        library=_field(bench, "BenchmarkConfig", "seeds"),
        help="how many seeds (0..N-1); each re-draws the Dirichlet site split, the per-site splits, pretraining "
        "and distillation",
    )
    _add(
        p,
        "--score-on",
        choices=("test", "val"),
        library=_field(bench, "BenchmarkConfig", "score_on"),
        help="cells the numbers are scored on: test (report) or val (tuning)",
    )
    _add(
        p,
        "--methods",
        type=_methods,
        library=_field(bench, "BenchmarkConfig", "methods"),
        help="comma-separated methods",
    )
    _add(
        p,
        "--evaluators",
        type=_evaluators,
        library=_field(bench, "BenchmarkConfig", "evaluators"),
        help="comma-separated evaluators",
    )
    _add(p, "--iterations", type=int_arg(0), library=_iterations, help="scdd distillation iterations")
    _add(
        p,
        "--dm-iterations",
        type=int_arg(0),
        library=_field(bench, "BenchmarkConfig", "dm_iterations"),
        help="iterations of the distribution-matching baseline (dm)",
    )
    _pretrain_steps_flag(p)
    _n_genes(p, _field(bench, "SplitConfig", "n_genes"))
    p.add_argument("--out", required=True, type=out_dir, help="output directory (results.md, results.json)")
    _add(
        p,
        "--pretraining",
        type=_pretraining,
        library=_pretraining_modes,
        help="scdd rows to run: fedavg (the shipped federation: scdd, scdd_noopt), pooled (scdd_pooled, an upper "
        "bound), or both",
    )
    _overrides(p, "run-config key for the federated rows (repeatable), as in `scdd simulate --set`")
    p.add_argument(
        "--leave-out",
        type=_name,
        metavar="SITE",
        help="a site that takes no part; every method is scored on its cells only",
    )
    p.add_argument(
        "--work", type=out_dir, help="keep the federated runs under this folder (without it: a temporary one, removed)"
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of methods not run this time from an existing results.json (rerun one method only)",
    )


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="a federation from one file split into sites, in this process (no Ray)",
        epilog=_epilog(
            f"scdd simulate {EXAMPLE} --label-key cell_type --site-key batch --k 10 --out runs/kang-sim",
            f"scdd simulate {EXAMPLE} --label-key cell_type --site-key batch --set dp-epsilon=8 --out runs/kang-dp",
        ),
    )
    fed = "server.config"
    p.add_argument("file", type=h5ad_in, help=".h5ad shared out to the simulated sites")
    _site_key(p, _field(fed, "FederationConfig", "sim_site_key"))
    _label_key(p, _field(fed, "FederationConfig", "label_key"))
    _add(
        p,
        "--k",
        type=int_arg(1),
        library=_field(fed, "FederationConfig", "cells_per_class"),
        help="codes per class per site",
    )
    _add(
        p,
        "--rounds",
        type=int_arg(1),
        library=_field(fed, "FederationConfig", "num_distill_rounds"),
        help="distillation rounds",
    )
    _num_sites(p, _field(fed, "FederationConfig", "sim_num_sites"))
    _add(
        p,
        "--device",
        type=_device,
        library=_field(fed, "FederationConfig", "device"),
        help="where the sites' models run: cpu, auto (a GPU when there is one), cuda, cuda:N",
    )
    _overrides(p, "any run-config key (repeatable), e.g. --set vae-local-steps=200")
    p.add_argument(
        "--out",
        required=True,
        type=out_dir,
        help="run directory to write (config.json, metrics.json, synthetic.h5ad, report.html, ...)",
    )


def _add_runs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the real Flower simulation (flwr run, Ray) on the bundled example data",
        epilog=_epilog("scdd demo --out runs/demo", "scdd demo --out runs/demo-short --set num-pretrain-rounds=2"),
    )
    p.add_argument(
        "--out",
        default="runs/demo",
        type=out_dir,
        help="run directory, Flower's state in <out>/.flwr (default: %(default)s)",
    )
    _add(
        p,
        "--timeout",
        type=_positive_float,
        library=_param("server.cli.demo", "run_demo", "timeout_s"),
        help="seconds before the run is stopped and reported as failed",
    )
    _overrides(p, "extra run-config values (repeatable)")
    p = sub.add_parser(
        "report", help="(re)write report.html of a run directory", epilog=_epilog("scdd report runs/kang-sim")
    )
    p.add_argument("run_dir", help="the directory of a completed run (out-dir/<run-id>)")


def _add_deployment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flwr-connection",
        help="coordinator: add the TLS SuperLink connection to $FLWR_HOME/config.toml (merged, made the default)",
        epilog=_epilog("scdd flwr-connection fedscdd --address 10.0.0.5:8000 --root-certificates certs/ca.crt"),
    )
    p.add_argument(
        "name", nargs="?", default="fedscdd", help="connection name used in flwr commands (default: %(default)s)"
    )
    p.add_argument(
        "--address", required=True, help="HOST:PORT of the SuperLink, the host a SAN of server.pem (e.g. 10.0.0.5:8000)"
    )
    p.add_argument("--root-certificates", required=True, help="the federation's ca.crt (stored as an absolute path)")
    p.add_argument("--no-default", action="store_true", help="keep flwr's current default connection")
    p = sub.add_parser(
        "verify-bundle",
        help="site: check that the app a SuperNode installed is exactly the release's code",
        epilog=_epilog("scdd verify-bundle /var/lib/fedscdd/supernode --source /opt/fedscdd/src"),
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
        type=_fab_hash,
        help="the run's fab-hash the coordinator published (optional): must be the release's",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `scdd` argument parser (`scdd certs` has its own: server.pki.cli.build_parser)."""
    parser = Parser(prog="scdd", description=DESCRIPTION)
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
        return exit_code(exc)
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
    except UsageError as exc:
        print(f"scdd {args.command}: error: {one_line(str(exc))}; see `scdd {args.command} --help`", file=sys.stderr)
        return 2
    except FedscddError as exc:
        print(f"scdd {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"scdd {args.command}: interrupted", file=sys.stderr)
        return 130
