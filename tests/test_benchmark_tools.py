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
    assert stats[3] == "1.28" and stats[5] == "0.00" and float(stats[6]) <= 8.0  # no DP-SGD: all of epsilon one-shot
    (sgd,) = _table("--counts", "--cells", "2000", "--epsilons", "8")
    assert float(sgd[3]) > float(stats[3]) and float(sgd[5]) > 0 and 7.9 <= float(sgd[6]) <= 8.0
