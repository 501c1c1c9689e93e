"""The processes a local tool started, found and stopped by PID (never by name), from Linux's /proc.

Used by ``scdd demo`` (a SuperLink whose SuperExec opens its own session, Ray workers that outlive
their parents), the loopback deployment tests and the demo-cost benchmark.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)


def stat_fields(pid: int | str) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state, ppid, pgrp, session, ...), or None when the process is gone.

    Index i holds field i + 3 of proc(5): the command name, which may contain spaces, is cut off first.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not reaped, does not)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _proc_table() -> dict[int, tuple[int, int]]:
    """Map every process id to (parent pid, session id)."""
    table = {}
    for entry in Path("/proc").iterdir():
        fields = stat_fields(entry.name) if entry.name.isdigit() else None
        if fields is not None:
            table[int(entry.name)] = (int(fields[1]), int(fields[3]))  # stat fields 4 (ppid) and 6 (session)
    return table


def started_pids(leader: int) -> list[int]:
    """The PIDs the ``leader`` process started: its descendants and every process in a session one of them leads,
    leader last.

    The SuperLink's SuperExec opens its own session, and Ray workers outlive their parents there,
    so descendants alone would miss them.
    """
    table = _proc_table()
    tree, frontier = {leader}, [leader]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, (pp, _) in table.items() if pp == parent and p not in tree]
        tree.update(kids)
        frontier.extend(kids)
    sessions = {p for p in tree if table.get(p, (0, 0))[1] == p} | {leader}
    found = tree | {p for p, (_, sid) in table.items() if sid in sessions}
    found.discard(leader)
    return [*sorted(found), leader]


def signal_all(pids: Iterable[int], sig: int) -> None:
    """Send ``sig`` to each of ``pids``; one that is already gone is skipped."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_session(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process ``proc`` started (``started_pids``); return the PIDs signalled."""
    pids = started_pids(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        signal_all(pids, sig)
        end = time.monotonic() + grace_s
        while time.monotonic() < end and any(alive(p) for p in pids):
            time.sleep(0.2)
            proc.poll()
        if not any(alive(p) for p in pids):
            break
    proc.poll()
    logger.info("stopped the processes of pid %d: %s", proc.pid, pids)
    return pids
