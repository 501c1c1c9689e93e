"""``scdd demo``: the real Flower simulation (``flwr run . local --stream``, Ray) on the bundled example data.

flwr 1.42 starts its managed local SuperLink detached and records no PID, so we start the
simulation SuperLink ourselves (own session, free port, ``FLWR_HOME`` under the run directory), point
a ``local`` connection at it, and stop exactly the processes of that session by PID at the end.
``flwr run --stream`` exits 0 even when the run fails, so the verdict comes from ``flwr ls``.

flwr 1.42 refuses to build a FAB from a directory holding both a root ``.gitignore`` and a
``fab-exclude`` list but no ``fab-include`` ("1 file(s) matched fab-include but were removed ...
.gitignore"). Where that happens the demo runs a staged copy of the app: exactly the files a FAB
carries (.py/.toml/.md of shared/, server/, client/) and the pyproject without ``fab-exclude``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.cli.processes import stop_session
from shared.errors import ConfigError, FedscddError

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
NUM_SUPERNODES = 4
FEDERATION_CONFIG = f"num-supernodes={NUM_SUPERNODES} client-resources-num-cpus=1"
# The demo's own run config: a third of the default's pretraining rounds, so that `make demo` (setup included) fits in
# 5 minutes on 2 cores; its cost and accuracy beside the default's: README "Demo cost" (benchmarks/demo_cost.py).
# `--set` values win over it (`scdd demo --set num-pretrain-rounds=30` runs the default config).
DEMO_RUN_CONFIG: dict[str, Any] = {"num-pretrain-rounds": 10}
COMPLETED = "finished:completed"
ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


class DemoFailed(FedscddError):
    """The Flower run did not finish with status completed."""


@dataclass(frozen=True)
class DemoResult:
    """What the demo ran and where its outputs are."""

    run_dir: Path
    flower_run_id: int
    status: str
    seconds: float


APP_PACKAGES = ("shared", "server", "client")
APP_SUFFIXES = (".py", ".toml", ".md")


def stage_app(dest: Path) -> Path:
    """Copy the Flower app's FAB files to ``dest`` (replacing it) and return ``dest``."""
    import shutil
    import tomllib

    import tomli_w

    shutil.rmtree(dest, ignore_errors=True)
    for pkg in APP_PACKAGES:
        for src in sorted((REPO / pkg).rglob("*")):
            if src.is_file() and src.suffix in APP_SUFFIXES and "__pycache__" not in src.parts:
                target = dest / src.relative_to(REPO)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    config.get("tool", {}).get("flwr", {}).get("app", {}).pop("fab-exclude", None)
    (dest / "pyproject.toml").write_text(tomli_w.dumps(config), encoding="utf-8")
    if (REPO / "README.md").is_file():
        shutil.copyfile(REPO / "README.md", dest / "README.md")
    return dest


def app_dir(home: Path) -> Path:
    """The checkout itself when flwr can build a FAB from it, else a staged copy (see the module docstring)."""
    from flwr.cli.build import build_fab_from_disk

    try:
        build_fab_from_disk(REPO)
        return REPO
    except ValueError as exc:
        logger.warning(
            "flwr cannot build a FAB from %s (%s); running a staged copy. Fix: add "
            'fab-include = ["**/*.py", "**/*.toml", "**/*.md"] to [tool.flwr.app]',
            REPO,
            str(exc).splitlines()[0],
        )
        return stage_app(home / "app")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_str(value: Any) -> str:
    return (
        json.dumps(value) if isinstance(value, str) else (str(value).lower() if isinstance(value, bool) else str(value))
    )


def flower_env(home: Path) -> dict[str, str]:
    """Environment of every flwr process: isolated FLWR_HOME, no telemetry/update check/runtime installs, our venv
    first."""
    env = {**os.environ, **ENV, "FLWR_HOME": str(home)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def start_superlink(home: Path, port: int, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """A simulation SuperLink in its own session (so its children can be found and stopped), ready on ``port``."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n',
        encoding="utf-8",
    )
    cmd = [
        str(Path(sys.executable).parent / "flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(home / "state.db"),
        "--log-file",
        str(home / "superlink.log"),
        "--disable-runtime-dependency-installation",
    ]
    proc = subprocess.Popen(
        cmd, env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait_ready(proc, home, port)
    except BaseException:
        stop_session(proc)
        raise
    logger.info("SuperLink pid %d ready on 127.0.0.1:%d", proc.pid, port)
    return proc


def _wait_ready(proc: subprocess.Popen[bytes], home: Path, port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            msg = f"flower-superlink exited with code {proc.returncode}; see {home / 'superlink.log'}"
            raise DemoFailed(msg)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:  # loopback only
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    msg = f"flower-superlink did not become ready within {timeout_s:g} s; see {home / 'superlink.log'}"
    raise DemoFailed(msg)


def _flwr(args: Sequence[str], env: Mapping[str, str], timeout: float) -> str:
    res = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if res.returncode != 0:
        msg = f"flwr {' '.join(args[:2])} failed (exit {res.returncode}): {(res.stderr or res.stdout)[-500:]}"
        raise DemoFailed(msg)
    return res.stdout


def run_status(run_id: int, env: Mapping[str, str]) -> str:
    """The run's status from ``flwr ls --run-id ... --format json`` (e.g. 'finished:completed')."""
    out = json.loads(_flwr(["ls", "local", "--run-id", str(run_id), "--format", "json"], env, 60))
    runs = out.get("runs", [])
    if not out.get("success", True) or not runs:
        msg = f"flwr ls did not report run {run_id}: {json.dumps(out)[:300]}"
        raise DemoFailed(msg)
    return str(runs[0].get("status", "unknown"))


def _stream(cmd: list[str], env: Mapping[str, str], timeout_s: float, echo: Any) -> tuple[int | None, bool]:
    """Run ``flwr run --stream``, echoing its lines; return (flower run id, finished before the timeout)."""
    proc = subprocess.Popen(cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    run_id: list[int] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            echo(line.rstrip("\n"))
            if not run_id and (m := re.search(r"started run (\d+)", line)):
                run_id.append(int(m.group(1)))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
        finished = True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        finished = False
    except BaseException:  # interrupted (Ctrl-C, SIGTERM via _signals_raise): do not leave the streaming client behind
        proc.kill()
        proc.wait()
        raise
    reader.join(timeout=5)
    return (run_id[0] if run_id else None), finished


def demo_run_config(data: Path, out: Path, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run config the demo passes to ``flwr run``: the bundled file, the output folder, ``DEMO_RUN_CONFIG``, then
    the user's ``--set`` values (which win)."""
    return {
        "sim-data-path": str(data),
        "out-dir": str(out.parent),
        "run-id": out.name,
        "expected-sites": NUM_SUPERNODES,
        **DEMO_RUN_CONFIG,
        **(overrides or {}),
    }


def run_demo(
    out: Path, *, timeout_s: float = 900.0, overrides: Mapping[str, Any] | None = None, echo: Any = logger.info
) -> DemoResult:
    """Run the demo federation with Flower's simulation engine; raise DemoFailed unless it completed."""
    if not (REPO / "pyproject.toml").is_file():
        msg = f"scdd demo runs the Flower app from a source checkout; no pyproject.toml beside {REPO}"
        raise ConfigError(msg)
    import shared

    data = Path(shared.__file__).resolve().parent / "example_data" / "kang_pbmc_muscat.h5ad"
    if not data.is_file():
        msg = f"the bundled example file is missing ({data}); reinstall fedscdd or run scdd simulate FILE"
        raise ConfigError(msg)
    out = Path(out).expanduser().resolve()
    home = out / ".flwr"
    env = flower_env(home)
    run_config = demo_run_config(data, out, overrides)
    app = app_dir(home)
    cmd = [
        str(Path(sys.executable).parent / "flwr"),
        "run",
        str(app),
        "local",
        "--stream",
        "--federation-config",
        FEDERATION_CONFIG,
        "--run-config",
        " ".join(f"{k}={_toml_str(v)}" for k, v in run_config.items()),
    ]
    t0 = time.perf_counter()
    with _signals_raise():
        return _run(cmd, env, home, out, timeout_s, echo, t0)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM / SIGHUP raise DemoFailed in the main thread while the block runs, so its cleanup (stopping the
    SuperLink session and Ray by PID) happens; by default those signals end Python without running ``finally``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    received: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if received:  # a repeated signal must not interrupt the cleanup the first one started
            return
        received.append(signum)
        msg = f"stopped by {signal.Signals(signum).name}; the demo's SuperLink session and Ray processes were stopped"
        raise DemoFailed(msg)

    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


def _run(
    cmd: list[str], env: Mapping[str, str], home: Path, out: Path, timeout_s: float, echo: Any, t0: float
) -> DemoResult:
    link = start_superlink(home, _free_port(), env)
    try:
        run_id, finished = _stream(cmd, env, timeout_s, echo)
        if run_id is None:
            msg = "flwr run did not start a run (see the output above)"
            raise DemoFailed(msg)
        if not finished:
            _flwr(["stop", str(run_id), "local"], env, 60)
            msg = f"run {run_id} did not finish within {timeout_s:g} s and was stopped"
            raise DemoFailed(msg)
        status = _final_status(run_id, env)
    finally:
        stop_session(link)
    if status != COMPLETED:
        msg = (
            f"Flower run {run_id} ended with status {status!r} (flwr run exits 0 even then); "
            f"see the log above and {home / 'superlink.log'}"
        )
        raise DemoFailed(msg)
    return DemoResult(out, run_id, status, time.perf_counter() - t0)


def _final_status(run_id: int, env: Mapping[str, str], wait_s: float = 60.0) -> str:
    """Poll ``flwr ls`` until the run is finished (bounded)."""
    end = time.monotonic() + wait_s
    status = run_status(run_id, env)
    while not status.startswith("finished") and time.monotonic() < end:
        time.sleep(1.0)
        status = run_status(run_id, env)
    return status
