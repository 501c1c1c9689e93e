"""The accounting table that the README's privacy section quotes comes out of benchmarks/dp_noise.py as stated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table(*args: str) -> list[list[str]]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dp_noise.py"), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| 2")]


def test_dp_noise_prints_the_noise_of_both_pretraining_modes() -> None:
    (stats,) = _table("--statistics", "--counts", "--cells", "2000", "--epsilons", "8")
    # no DP-SGD: all of epsilon one-shot; the class means get 1/2 of the other releases' noise
    assert stats[3] == "0.84" and stats[4] == "1.69" and stats[6] == "0.00" and float(stats[7]) <= 8.0
    (sgd,) = _table("--counts", "--cells", "2000", "--epsilons", "8")
    assert sgd[3] == "-" and float(sgd[4]) > float(stats[4]) and float(sgd[6]) > 0 and 7.9 <= float(sgd[7]) <= 8.0
