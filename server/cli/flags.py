"""How every `scdd` command reads its flags: value types that refuse a bad value in one line, defaults read from
the library when --help is shown, and the flags several commands share (``server.cli`` holds the commands).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from shared.errors import ConfigError

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
        note: LibraryDefault | None = getattr(action, "library_note", None)
        if note is not None:
            text = f"{text}; {note()}".replace("%", "%%")
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


def positive_float(text: str) -> float:
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


def ks(text: str) -> tuple[int, ...]:
    return _int_list(text, "comma-separated whole numbers >= 1, like 1,10,50")


def _steps(text: str) -> tuple[int, ...]:
    values = _int_list(text, "VAE,SCDG step counts >= 1 like 2000,1000 (or one number for both)")
    if len(values) > 2:
        _refuse("VAE,SCDG step counts >= 1 like 2000,1000 (or one number for both)", text)
    return values


def name(text: str) -> str:
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


def h5ad_out(text: str) -> str:
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


def methods(text: str) -> tuple[str, ...]:
    from server.bench.benchmark import METHODS

    return _subset(text, METHODS, "methods")


def evaluators(text: str) -> tuple[str, ...]:
    from shared.evaluation import EVALUATORS

    return _subset(text, EVALUATORS, "evaluators")


def pretraining(text: str) -> tuple[str, ...]:
    return _subset(text, pretraining_modes(), "pretraining modes")


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


def device(text: str) -> str:
    from shared.device import check_device

    try:
        check_device(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def fab_hash(text: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text.strip()):
        _refuse("the 64 hex digits of the run's fab-hash (as the coordinator published it)", text)
    return text.strip()


# --------------------------------------------------------------------------- library defaults (read for --help)


def field(module: str, cls: str, name: str) -> LibraryDefault:
    """The default of field ``name`` of the library dataclass ``module.cls``."""
    return lambda: getattr(getattr(importlib.import_module(module), cls)(), name)


def param(module: str, func: str, name: str) -> LibraryDefault:
    """The default of parameter ``name`` of the library function ``module.func``."""
    return lambda: inspect.signature(getattr(importlib.import_module(module), func)).parameters[name].default


def _pretrain_steps() -> str:
    from shared.pretrain import PretrainConfig

    cfg = PretrainConfig()
    return f"{cfg.vae.steps},{cfg.scdg.steps}"


def iterations() -> object:
    from server.bench.benchmark import BenchmarkConfig
    from shared.distill import DistillConfig, resolve_iterations

    fixed = DistillConfig().iterations
    if fixed is not None and fixed >= 0:
        return fixed
    by_k = ", ".join(f"k={k}: {resolve_iterations(DistillConfig(k=k))}" for k in BenchmarkConfig().ks)
    return f"by k as in a federation, {by_k}"


def pretraining_modes() -> tuple[str, ...]:
    from server.bench.benchmark import PRETRAINING_MODE

    return tuple(sorted(set(PRETRAINING_MODE.values())))


# --------------------------------------------------------------------------- flags (one helper per shared flag)


def add(p: argparse.ArgumentParser, *flags: str, library: LibraryDefault | None = None, **kw: Any) -> None:
    action = p.add_argument(*flags, **kw)
    if library is not None:
        action.library_default = library  # type: ignore[attr-defined]  # read by HelpFormatter


def command(sub: argparse._SubParsersAction, name: str, help_text: str, *examples: str) -> argparse.ArgumentParser:
    """A subcommand's parser, its ``--help`` ending with ``examples`` (command lines that run on the bundled data)."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, epilog=epilog(*examples))
    return parser


def codes_per_class(p: argparse.ArgumentParser, library: LibraryDefault, text: str) -> None:
    """``--k``: codes per class, one number."""
    add(p, "--k", type=int_arg(1), library=library, help=text)


def epilog(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def label_key(p: argparse.ArgumentParser, library: LibraryDefault | None, **kw: Any) -> None:
    add(p, "--label-key", type=name, library=library, help="obs column with the cell types", **kw)


def site_key(p: argparse.ArgumentParser, library: LibraryDefault) -> None:
    help_text = "obs column naming the sites; absent from obs (or '') -> a Dirichlet(0.5) label-skew split"
    add(p, "--site-key", library=library, help=help_text)


def num_sites(p: argparse.ArgumentParser, library: LibraryDefault) -> None:
    help_text = "sites of the Dirichlet split (when the site key is not in obs)"
    add(p, "--num-sites", type=int_arg(1), library=library, help=help_text)


def expect(p: argparse.ArgumentParser, library: LibraryDefault) -> None:
    help_text = "what X holds: raw counts, log-normalised values, or auto (detected)"
    add(p, "--expect", choices=["auto", "counts", "lognorm"], library=library, help=help_text)


def n_genes(p: argparse.ArgumentParser, library: LibraryDefault, text: str = "variable genes kept") -> None:
    add(p, "--n-genes", type=int_arg(10), library=library, help=text)


def pretrain_steps_flag(p: argparse.ArgumentParser) -> None:
    help_text = "VAE,SCDG pretraining steps (one number: both)"
    add(p, "--pretrain-steps", type=_steps, library=_pretrain_steps, help=help_text)


def seed(p: argparse.ArgumentParser, library: LibraryDefault) -> None:
    add(p, "--seed", type=int_arg(0), library=library, help="random seed of splits, pretraining and distillation")


def overrides(p: argparse.ArgumentParser, text: str) -> None:
    action = p.add_argument(
        "--set", dest="overrides", action="append", default=[], type=run_config_item, metavar="KEY=VALUE", help=text
    )
    action.library_note = run_config_defaults  # type: ignore[attr-defined]  # read by HelpFormatter


def run_config_defaults() -> str:
    """Every run-config key with its default, as ``--set`` writes it (read from FederationConfig when shown)."""
    from server.config import FederationConfig

    def written(value: object) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    return "the keys, as a run starts: " + ", ".join(
        f"{k}={written(v)}" for k, v in FederationConfig().to_run_config().items()
    )
