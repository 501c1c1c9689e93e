"""Every `scdd` flag: one line for every bad value, help defaults that are the library's, examples that run.

The bad-value table covers every value-taking argument of every subcommand (read from the real parsers, so a
new flag without a bad value fails here). Bad values are refused before any data is read: the commands' work
functions are replaced by tripwires.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import build_parser, flags, main, parse, subparser
from server.pki import cli as certs_cli

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "shared" / "example_data" / "kang_pbmc_muscat.h5ad"
NOT_H5AD = REPO / "README.md"  # an existing file that is no .h5ad (and no directory)

# Per command: (positional arguments, options) that are valid; a bad value replaces the positional or is added.
BASE: dict[str, tuple[list[str], list[str]]] = {
    "check": (["{ex}"], []),
    "distill": (["{ex}"], ["--out", "{tmp}/synthetic.h5ad"]),
    "pretrain": (["{ex}"], ["--label-key", "cell_type", "--out", "{tmp}/ref"]),
    "benchmark": (["{ex}"], ["--out", "{tmp}/bench"]),
    "simulate": (["{ex}"], ["--out", "{tmp}/sim"]),
    "demo": ([], ["--out", "{tmp}/demo"]),
    "report": (["{tmp}"], []),
    "flwr-connection": ([], ["--address", "127.0.0.1:9", "--root-certificates", "{tmp}/ca.crt"]),
    "verify-bundle": (["{tmp}"], ["--source", "{tmp}"]),
    "certs": ([], ["--out", "{tmp}/certs", "--san", "127.0.0.1"]),
}
MISSING = "{tmp}/missing.h5ad"
# (command, dest) -> bad values: one token is the flag's value (or replaces the positional); more tokens are added as
# they are (a flag that needs another flag to be read).
BAD: dict[tuple[str, str], list[list[str]]] = {
    ("check", "file"): [[MISSING], ["{not_h5ad}"]],
    ("check", "label_key"): [[""]],
    ("check", "expect"): [["raw"]],
    ("check", "min_cells_per_class"): [["0"], ["two"]],
    ("distill", "file"): [[MISSING], ["{not_h5ad}"]],
    ("distill", "label_key"): [[" "]],
    ("distill", "expect"): [["normalised"]],
    ("distill", "k"): [["0"], ["-1"], ["ten"]],
    ("distill", "iterations"): [["-5"], ["1.5"]],
    ("distill", "n_genes"): [["5"], ["many"]],
    ("distill", "pretrain_steps"): [["0,100"], ["a,b"], ["1,2,3"]],
    ("distill", "embedding_key"): [[""]],
    ("distill", "seed"): [["-1"], ["1.5"]],
    ("distill", "out"): [["{tmp}/synthetic.csv"], ["{tmp}"]],
    ("pretrain", "file"): [[MISSING], ["{not_h5ad}"]],
    ("pretrain", "label_key"): [[""]],
    ("pretrain", "expect"): [["x"]],
    ("pretrain", "n_genes"): [["9"]],
    ("pretrain", "pretrain_steps"): [[""]],
    ("pretrain", "seed"): [["x"]],
    ("pretrain", "out"): [["{not_h5ad}"]],
    ("benchmark", "files"): [[MISSING], ["{not_h5ad}"]],
    ("benchmark", "label_key"): [[""]],
    ("benchmark", "num_sites"): [["0"], ["three"]],
    ("benchmark", "k"): [["0"], ["1,x"], ["-10"]],
    ("benchmark", "seeds"): [["0"], ["1.5"]],
    ("benchmark", "score_on"): [["train"]],
    ("benchmark", "methods"): [["nope"], ["random,nope"], [","]],
    ("benchmark", "evaluators"): [["svm"]],
    ("benchmark", "iterations"): [["-2"]],
    ("benchmark", "dm_iterations"): [["-1"]],
    ("benchmark", "pretrain_steps"): [["-1"]],
    ("benchmark", "n_genes"): [["0"]],
    ("benchmark", "out"): [["{not_h5ad}"]],
    ("benchmark", "pretraining"): [["central"]],
    ("benchmark", "overrides"): [["novalue"], ["no-such-key=1"], ["n-genes=3"]],
    ("benchmark", "leave_out"): [[""]],
    ("benchmark", "work"): [["{not_h5ad}"]],
    ("simulate", "file"): [[MISSING], ["{not_h5ad}"]],
    ("simulate", "label_key"): [[""]],
    ("simulate", "k"): [["0"]],
    ("simulate", "rounds"): [["0"]],
    ("simulate", "num_sites"): [["-3"]],
    ("simulate", "device"): [["tpu"], ["cuda:x"]],
    ("simulate", "overrides"): [["=1"], ["vae-local-steps=0"]],
    ("simulate", "out"): [["{not_h5ad}"]],
    ("demo", "out"): [["{not_h5ad}"]],
    ("demo", "timeout"): [["0"], ["soon"]],
    ("demo", "overrides"): [["nokey=1"], ["min-sites=0"]],
    ("report", "run_dir"): [["{tmp}/nowhere"]],
    ("flwr-connection", "name"): [["bad name!"]],
    ("flwr-connection", "address"): [["https://x:1"]],
    ("flwr-connection", "root_certificates"): [["{tmp}/missing-ca.crt"]],
    ("verify-bundle", "app"): [["{tmp}/nowhere"]],
    ("verify-bundle", "source"): [["{tmp}/nowhere"]],
    ("verify-bundle", "fab_hash"): [["xyz"]],
    ("certs", "out"): [["{not_h5ad}"]],
    ("certs", "san"): [["http://x/"]],
    ("certs", "site"): [["../a"]],
    ("certs", "days"): [["0"], ["x"]],
    ("certs", "ca_dir"): [["--server-only", "--ca-dir", "{tmp}/nowhere"]],
}
NO_BAD_VALUE = {  # value-taking arguments no value of which is wrong in itself
    ("benchmark", "site_key"): "any text: an obs column, or a name absent from obs (or '') for a Dirichlet split",
    ("simulate", "site_key"): "any text: an obs column, or a name absent from obs (or '') for a Dirichlet split",
}
REFUSED_BY_LIBRARY = {  # exit 1 (the library's own check, one line), not 2 (the parser's)
    ("report", "run_dir"): "server.report checks the run's files",
    ("flwr-connection", "name"): "server.cli.deployment checks name, address and CA before writing flwr's config",
    ("flwr-connection", "address"): "server.cli.deployment (tests/server/test_deployment_tools.py pins exit 1)",
    ("flwr-connection", "root_certificates"): "server.cli.deployment reads the CA certificate",
    ("verify-bundle", "app"): "the installed app is found by server.cli.deployment (test_deployment_tools pins 1)",
    ("verify-bundle", "source"): "server.cli.deployment rebuilds the release's FAB from it",
    ("certs", "san"): "server.pki.certs parses SANs before writing anything",
    ("certs", "site"): "server.pki.certs checks site names (tests/shared/test_certs.py pins exit 1)",
    ("certs", "ca_dir"): "server.pki.certs reads the CA from it",
}


def _parsers() -> dict[str, argparse.ArgumentParser]:
    top = build_parser()
    names = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    found = {name: subparser(top, name) for name in names if name != "certs"}
    found["certs"] = certs_cli.build_parser()  # `scdd certs` is parsed by server.pki.cli
    return found


def _value_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.nargs != 0]  # store_true / --help take no value


def _cases() -> list[tuple[str, str, list[str]]]:
    return [(cmd, dest, bad) for (cmd, dest), values in BAD.items() for bad in values]


def _argv(command: str, dest: str, bad: list[str], tmp: Path) -> list[str]:
    positionals, options = BASE[command]
    action = next(a for a in _value_actions(_parsers()[command]) if a.dest == dest)
    if not action.option_strings:
        argv = [*bad, *positionals[1:], *options]
    elif len(bad) == 1:
        argv = [*positionals, *options, action.option_strings[-1], bad[0]]
    else:
        argv = [*positionals, *options, *bad]
    subst = {"{tmp}": str(tmp), "{ex}": str(EXAMPLE), "{not_h5ad}": str(NOT_H5AD)}
    for key, value in subst.items():
        argv = [a.replace(key, value) for a in argv]
    return [command, *argv]


def test_the_bad_value_table_covers_every_flag_of_every_command() -> None:
    parsers = _parsers()
    assert set(BASE) == set(parsers)
    declared = {(cmd, a.dest) for cmd, p in parsers.items() for a in _value_actions(p)}
    missing = declared - set(BAD) - set(NO_BAD_VALUE)
    assert not missing, f"flags without a bad-value case (add one to BAD, or to NO_BAD_VALUE with a reason): {missing}"
    stale = (set(BAD) | set(NO_BAD_VALUE) | set(REFUSED_BY_LIBRARY)) - declared
    assert not stale, f"table entries for flags that do not exist: {stale}"
    assert not set(BAD) & set(NO_BAD_VALUE)


@pytest.fixture
def tripwires(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A bad value must be refused before any work: the commands' work functions fail the test if reached."""
    import server.bench.benchmark
    import server.cli.demo
    import server.cli.simulation
    import server.cli.single_site
    import server.reference
    import shared.data

    def reached(*args: object, **kwargs: object) -> None:
        raise AssertionError("a bad value reached the command's work")

    for module, name in [
        (shared.data, "check_file"),
        (shared.data, "read_h5ad"),
        (server.cli.single_site, "distill_file"),
        (server.reference, "pretrain_reference"),
        (server.bench.benchmark, "run"),
        (server.cli.simulation, "simulate_file"),
        (server.cli.demo, "run_demo"),
    ]:
        monkeypatch.setattr(module, name, reached)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))


def _assert_one_line(err: str, command: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"scdd {command}: error: "), err
    assert "Traceback" not in err


@pytest.mark.parametrize(("command", "dest", "bad"), _cases(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
@pytest.mark.usefixtures("tripwires")
def test_every_bad_value_is_refused_in_one_line(
    command: str, dest: str, bad: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _argv(command, dest, bad, tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == (1 if (command, dest) in REFUSED_BY_LIBRARY else 2), (argv, err)
    _assert_one_line(err, command)
    assert not (tmp_path / "certs").exists()  # nothing was written


def test_an_unknown_command_or_renamed_flag_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scdd: error: argument command: invalid choice: 'nope'") and len(err.splitlines()) == 1
    for argv, command, hint in [
        (["simulate", "--data", str(EXAMPLE), "--out", "x"], "simulate", "give the .h5ad as the first argument"),
        (["benchmark", str(EXAMPLE), "--sites", "3", "--out", "x"], "benchmark", "--sites is now --num-sites"),
        (["check", str(EXAMPLE), "--bogus"], "check", "unrecognized arguments: --bogus"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        _assert_one_line(err, command)
        assert hint in err


@pytest.mark.slow  # over 5 s: outside the fast tier
def test_the_real_process_prints_the_same_single_line(tmp_path: Path) -> None:
    """The console script's process, not just main(): log handlers and the interpreter add nothing."""
    cases = [
        (["benchmark", str(EXAMPLE), "--methods", "nope", "--out", str(tmp_path)], 2),
        (["simulate", str(EXAMPLE), "--set", "n-genes=3", "--out", str(tmp_path / "sim")], 2),
        (["report", str(tmp_path / "nowhere")], 1),
        (["certs", "--out", str(tmp_path / "certs"), "--san", "http://x/"], 1),
    ]
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    procs = [
        (
            subprocess.Popen(
                [sys.executable, "-m", "server.cli", *argv],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
            argv,
            code,
        )
        for argv, code in cases
    ]
    for proc, argv, code in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, (argv, err)
        _assert_one_line(err, argv[0])


# --------------------------------------------------------------------------- help: defaults are the library's


def _library_defaults() -> dict[tuple[str, str], str]:
    """What each flag's help must state, read here from the library (dataclasses, function signatures)."""
    from server.bench.benchmark import PRETRAINING_MODE, BenchmarkConfig, SplitConfig
    from server.cli.demo import run_demo
    from server.cli.single_site import distill_file
    from server.config import FederationConfig
    from server.pki.certs import DEFAULT_DAYS
    from server.reference import pretrain_reference
    from shared.data import check_file
    from shared.distill import DistillConfig, resolve_iterations
    from shared.pretrain import PretrainConfig
    from shared.protocol import SiteSpec

    def param(func: object, name: str) -> object:
        return inspect.signature(func).parameters[name].default  # type: ignore[arg-type]

    pre, bench, split, fed = PretrainConfig(), BenchmarkConfig(), SplitConfig(), FederationConfig()
    steps = f"{pre.vae.steps},{pre.scdg.steps}"
    by_k = ", ".join(f"k={k}: {resolve_iterations(DistillConfig(k=k))}" for k in bench.ks)
    iterations = f"by k as in a federation, {by_k}"
    return {
        ("check", "label_key"): SiteSpec().label_key,
        ("check", "expect"): param(check_file, "expect"),
        ("check", "min_cells_per_class"): param(check_file, "min_cells_per_class"),
        ("distill", "label_key"): param(distill_file, "label_key"),
        ("distill", "expect"): param(distill_file, "expect"),
        ("distill", "k"): DistillConfig().k,
        ("distill", "iterations"): iterations,
        ("distill", "n_genes"): param(distill_file, "n_genes"),
        ("distill", "pretrain_steps"): steps,
        ("distill", "seed"): param(distill_file, "seed"),
        ("pretrain", "expect"): param(pretrain_reference, "expect"),
        ("pretrain", "n_genes"): param(pretrain_reference, "n_genes"),
        ("pretrain", "pretrain_steps"): steps,
        ("pretrain", "seed"): pre.seed,
        ("benchmark", "label_key"): split.label_key,
        ("benchmark", "site_key"): split.site_key,
        ("benchmark", "num_sites"): split.n_sites,
        ("benchmark", "k"): ",".join(map(str, bench.ks)),
        ("benchmark", "seeds"): bench.seeds,
        ("benchmark", "score_on"): bench.score_on,
        ("benchmark", "methods"): ",".join(bench.methods),
        ("benchmark", "evaluators"): ",".join(bench.evaluators),
        ("benchmark", "iterations"): iterations,
        ("benchmark", "dm_iterations"): bench.dm_iterations,
        ("benchmark", "pretrain_steps"): f"{bench.pretrain.vae.steps},{bench.pretrain.scdg.steps}",
        ("benchmark", "n_genes"): split.n_genes,
        ("benchmark", "pretraining"): ",".join(sorted(set(PRETRAINING_MODE.values()))),
        ("simulate", "site_key"): fed.sim_site_key,
        ("simulate", "label_key"): fed.label_key,
        ("simulate", "k"): fed.cells_per_class,
        ("simulate", "rounds"): fed.num_distill_rounds,
        ("simulate", "num_sites"): fed.sim_num_sites,
        ("simulate", "device"): fed.device,
        ("demo", "timeout"): param(run_demo, "timeout_s"),
        ("certs", "days"): DEFAULT_DAYS,
    }


def _help_lines(parser: argparse.ArgumentParser, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """option string -> its entry in --help (continuation lines joined; a wide terminal keeps values whole)."""
    monkeypatch.setenv("COLUMNS", "1000")
    found: dict[str, str] = {}
    current = ""
    for line in parser.format_help().splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            found[current] = line.strip()
        elif current and line.startswith("   ") and line.strip():
            found[current] += " " + line.strip()
        else:
            current = ""
    return found


def test_help_states_the_library_defaults_and_flags_restate_none(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _library_defaults()
    checked = 0
    for command, parser in _parsers().items():
        lines = _help_lines(parser, monkeypatch)
        for action in _value_actions(parser):
            if not action.option_strings:
                continue
            line = lines[action.option_strings[-1]]
            key = (command, action.dest)
            if key in expected:
                assert action.default is None, f"{key}: default None (the library's), not {action.default!r}"
                assert f"(default: {expected[key]})" in line, f"{key}: help says {line!r}, library {expected[key]!r}"
                assert len(re.findall(r"\bdefault", line)) == 1, f"{key}: a second, restated default in {line!r}"
                checked += 1
            elif re.search(r"\bdefault", line):  # a default of the CLI's own (e.g. demo --out): the real one
                assert f"(default: {action.default})" in line, f"{key}: help states another default: {line!r}"
    assert checked == len(expected)


def test_an_empty_command_line_reaches_the_library_defaults(tmp_path: Path) -> None:
    from server.bench.benchmark import BenchmarkConfig, SplitConfig
    from server.cli import commands
    from shared.distill import DistillConfig
    from shared.pretrain import PretrainConfig

    parser = build_parser()
    args = parse(parser, ["benchmark", str(EXAMPLE), "--out", str(tmp_path)])
    cfg, lib = commands._benchmark_config(args), BenchmarkConfig()
    assert (cfg.methods, cfg.ks, cfg.seeds, cfg.evaluators, cfg.dm_iterations, cfg.score_on) == (
        lib.methods,
        lib.ks,
        lib.seeds,
        lib.evaluators,
        lib.dm_iterations,
        lib.score_on,
    )
    assert cfg.split == SplitConfig() and cfg.distill == DistillConfig() and cfg.pretrain == PretrainConfig()
    assert commands._pretrain_config(None, None) == PretrainConfig()
    args = parse(parser, ["simulate", str(EXAMPLE), "--out", str(tmp_path / "sim")])
    assert commands.simulate_overrides(args) == {}  # the run config's own defaults (pyproject = FederationConfig)
    args = parse(parser, ["benchmark", str(EXAMPLE), "--num-sites", "5", "--k", "2", "--out", str(tmp_path)])
    cfg = commands._benchmark_config(args)
    assert cfg.split.n_sites == 5 and cfg.ks == (2,) and cfg.distill.iterations == DistillConfig().iterations


# --------------------------------------------------------------------------- help: examples that run


def _examples() -> list[tuple[str, str]]:
    found = []
    for command, parser in _parsers().items():
        lines = [ln.strip() for ln in (parser.epilog or "").splitlines() if ln.strip().startswith("scdd ")]
        assert lines, f"`scdd {command} --help` shows no example"
        found += [(command, line) for line in lines]
    return found


@pytest.mark.parametrize(("command", "line"), _examples(), ids=lambda v: v[:60])
def test_every_help_example_parses(command: str, line: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the examples name the bundled file relative to the checkout
    argv = shlex.split(line)[1:]
    assert argv[0] == command
    if command == "certs":
        args = certs_cli.build_parser().parse_args(argv[1:])
    else:
        args = parse(build_parser(), argv)
        assert args.command == command
    assert args is not None


def test_the_check_example_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(REPO)
    lines = [line for command, line in _examples() if command == "check"]
    for line in lines:
        assert main(shlex.split(line)[1:]) == 0
        assert "OK: this file can join a federation." in capsys.readouterr().out


def test_set_help_lists_every_run_config_key_as_a_run_starts() -> None:
    """`--set` help is generated from FederationConfig: every key, with the value a run starts from."""
    from server.config import FederationConfig

    text = flags.run_config_defaults()
    for key, value in FederationConfig().to_run_config().items():
        written = str(value).lower() if isinstance(value, bool) else str(value)
        assert f"{key}={written}" in text.split(": ", 1)[1].split(", "), key
