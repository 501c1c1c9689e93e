"""Process helpers for the loopback deployment test: free ports, Flower env, logged processes, bounded waits.

Every process is started in its own session (process group) so that stopping it also stops the
children Flower spawns (SuperExec, ServerApp, ClientApp processes); processes are only ever
stopped through the handle this module returned, never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.cli.processes import signal_all, started_pids

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent  # the venv running pytest holds flwr, flower-superlink, flower-supernode
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def executable(name: str) -> str:
    """Path of a Flower console script in the running venv (falls back to the name on PATH)."""
    path = BIN / name
    return str(path) if path.is_file() else name


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all sockets held open while choosing, so none repeats)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for one Flower component: its own FLWR_HOME, no telemetry/update check/runtime installs, no proxy."""
    flwr_home.mkdir(parents=True, exist_ok=True, mode=0o700)
    env = dict(os.environ)
    env.update(FLWR_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # SuperExec / flwr-serverapp / flwr-clientapp of this venv
    env["NO_PROXY"] = env["no_proxy"] = f"{HOST},localhost"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Proc:
    """A started process with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    argv: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exit_code(self, timeout: float = 0.0) -> int | None:
        """The leader's exit code once it exited (waiting up to ``timeout`` s), else None.

        The leader is NOT reaped here (WNOWAIT): while it is an unreaped zombie its pid, which is also
        the process group id, cannot be reused, so :func:`stop` can signal the group safely.
        """
        if self.popen.returncode is not None:
            return self.popen.returncode
        end = time.monotonic() + timeout
        while True:
            try:
                info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # reaped elsewhere
                return self.popen.returncode if self.popen.returncode is not None else -1
            if info is not None and info.si_pid == self.pid:
                return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
            if time.monotonic() >= end:
                return None
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.exit_code() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


def start(name: str, argv: Sequence[str], env: Mapping[str, str], log_dir: Path, *, cwd: Path | None = None) -> Proc:
    """Start ``argv`` in a new session, stdout+stderr to ``log_dir/<name>.log``."""
    log = log_dir / f"{name}.log"
    with open(log, "wb") as fh:
        fh.write(("$ " + shlex.join(argv) + "\n").encode())
        fh.flush()
        popen = subprocess.Popen(
            list(argv),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    return Proc(name, popen, log, list(argv))


def _signal_group(pid: int, sig: int) -> None:
    """``sig`` to ``pid`` and every process it started (found by PID: its own session included)."""
    signal_all(started_pids(pid), sig)


def stop(proc: Proc, *, timeout: float = 15.0) -> None:
    """Stop the process and its process group: SIGTERM, bounded wait, SIGKILL to what is left, then reap the leader."""
    if proc.popen.returncode is None:  # not reaped yet, so the group id still belongs to this process
        _signal_group(proc.pid, signal.SIGTERM)
        proc.exit_code(timeout)
        # Children (SuperExec, ServerApp/ClientApp processes) may outlive the leader: finish the group off.
        _signal_group(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.popen.wait(timeout=5.0)


def kill(proc: Proc) -> None:
    """SIGKILL the process group at once (a machine that dies without saying goodbye), then reap the leader."""
    if proc.popen.returncode is None:
        _signal_group(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.popen.wait(timeout=5.0)


def wait_exit(proc: Proc, timeout: float) -> int | None:
    """The exit code, or None if still running after ``timeout`` s (the process is not reaped: see Proc.exit_code)."""
    return proc.exit_code(timeout)


def wait_until(pred: Any, timeout: float, *, interval: float = 0.5, procs: Sequence[Proc] = ()) -> bool:
    """Poll ``pred()`` until true or ``timeout``; raise early if one of ``procs`` died meanwhile."""
    end = time.monotonic() + timeout
    while True:
        if pred():
            return True
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited with code {p.exit_code()} while waiting:\n{p.tail()}")
        if time.monotonic() >= end:
            return False
        time.sleep(interval)


def https_ok(url: str, cafile: Path, *, timeout: float = 2.0) -> bool:
    """True when ``url`` answers 200 over TLS verified against ``cafile`` (hostname checked)."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


@dataclass
class CliResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (
            f"$ {shlex.join(self.argv)}\nrc={self.returncode}\n"
            f"--- stdout\n{self.stdout[-6000:]}\n--- stderr\n{self.stderr[-6000:]}"
        )


def flwr(args: Sequence[str], env: Mapping[str, str], *, timeout: float, cwd: Path | None = None) -> CliResult:
    """Run the ``flwr`` CLI (bounded; its own session so a timeout kills everything it started)."""
    return command([executable("flwr"), *args], env, timeout=timeout, cwd=cwd)


def command(argv: Sequence[str], env: Mapping[str, str], *, timeout: float, cwd: Path | None = None) -> CliResult:
    """Run one command to completion, output captured (bounded; its own session so a timeout kills everything it
    started)."""
    argv = [str(a) for a in argv]
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=dict(env),
        cwd=cwd,
        start_new_session=True,
    ) as popen:
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(popen.pid, signal.SIGKILL)
            out, err = popen.communicate(timeout=10)
            return CliResult(
                argv,
                -9,
                out.decode(errors="replace"),
                err.decode(errors="replace") + f"\n[timed out after {timeout:g} s]",
            )
    return CliResult(argv, popen.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def json_from_output(text: str) -> Any:
    """The JSON document in a CLI's stdout (Flower may print log lines around it)."""
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise ValueError(f"no JSON in output: {text[:500]!r}")
    obj, _ = json.JSONDecoder().raw_decode(text[start:])
    return obj


def iter_logs(procs: Sequence[Proc]) -> Iterator[str]:
    for p in procs:
        yield f"===== {p.name} (pid {p.pid}, rc {p.exit_code()}) {p.log}\n{p.tail(80)}"
