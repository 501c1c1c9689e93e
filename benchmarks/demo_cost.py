"""Wall time and peak memory of `scdd demo` (the Ray simulation of `make demo`), every process included.

Usage: python benchmarks/demo_cost.py [--out runs/demo-cost] [--set KEY=VALUE ...]

Ray starts its workers as daemons outside the demo's process tree, so memory is sampled as the
summed resident set size (RSS, from /proc) of every process of this user that started after the
demo did, every 0.5 s; the peak of that sum is printed with the wall time, the Flower run's status
and the per-round accuracy. Run it on an otherwise idle machine: other new processes would count.
Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from server.cli.processes import stat_fields

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
# the run log's lines that time each phase
PHASES = ("federated pretraining:", "distill-", "evaluate-", "report written")
TICKS = os.sysconf("SC_CLK_TCK")


def _start_ticks(pid: str) -> int | None:
    fields = stat_fields(pid)
    return None if fields is None else int(fields[19])  # field 22: start time in clock ticks since boot


def _rss_bytes(pid: str) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def new_processes_rss(since_ticks: int, uid: int) -> tuple[int, int]:
    """(summed RSS, count) of this user's processes started at or after ``since_ticks``."""
    total, n = 0, 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
        except OSError:
            continue
        start = _start_ticks(pid)
        if start is not None and start >= since_ticks and int(pid) != os.getpid():
            total += _rss_bytes(pid)
            n += 1
    return total, n


def main() -> int:
    """Run the demo once and print its cost."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "demo-cost"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on to scdd demo")
    args = p.parse_args()
    uptime_ticks = int(float(Path("/proc/uptime").read_text().split()[0]) * TICKS)
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    scdd = Path(sys.executable).with_name("scdd")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(scdd), "demo", "--out", args.out, *(a for kv in args.set for a in ("--set", kv))],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak, peak_n = 0, 0
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    while proc.poll() is None:
        rss, n = new_processes_rss(uptime_ticks, os.getuid())
        if rss > peak:
            peak, peak_n = rss, n
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    reader.join(timeout=5)
    print("".join(lines[-8:]), end="")
    metrics_path = Path(args.out) / "metrics.json"
    accs = []
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        accs = [
            tuple(round(r["aggregate"]["cell_weighted"][e]["accuracy"], 3) for e in ("mlp", "logreg"))
            for r in m["rounds"]
        ]
    log = Path(args.out) / "run.log"
    phases = (
        [ln.split(": ", 1)[1].strip() for ln in log.read_text().splitlines() if any(p in ln for p in PHASES)]
        if log.is_file()
        else []
    )
    print(
        f"scdd demo: exit {proc.returncode}, wall {wall:.0f} s, "
        f"peak summed RSS {peak / 2**30:.2f} GiB over {peak_n} processes, "
        f"(MLP, LR) accuracy per round {accs}; " + "; ".join(phases)
    )
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
