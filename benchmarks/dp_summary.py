"""Markdown table of a dp_curve.sh (or dp_denoise_pair.sh arm) folder: test and validation accuracy (MLP, logistic
regression) and the epsilon each site's accountant spent per run; the means over seeds per file and over every run per
epsilon; the membership audits: the largest over sites and seeds, and how many site audits score above their own
chance bound (``shared.audit.null_bound``; runs of releases without the bound count as n/a).

python benchmarks/dp_summary.py OUT_DIR
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

AUDITS = ("seed_mia", "population_mia", "density_mia")
NAN = float("nan")


def runs(out: Path) -> list[tuple[str, str, str, Path]]:
    """(file name, epsilon, seed, log path) of every run log in ``out`` (``NAME-epsE-seedS.log``), sorted."""
    found = []
    for log in sorted(out.glob("*-eps*-seed*.log")):
        m = re.match(r"(.+)-eps([\d.]+)-seed(\d+)\.log$", log.name)
        if m:
            found.append((*m.groups(), log))
    return found


def scores(mt: dict) -> tuple[float, float, float, float]:
    """(test MLP, test LR, validation MLP, validation LR) of a finished run's last round, cell-weighted over sites."""
    agg = mt["rounds"][-1]["aggregate"]
    cw, val = agg["cell_weighted"], agg.get("validation", {}).get("cell_weighted", {})
    return (
        cw["mlp"]["accuracy"],
        cw["logreg"]["accuracy"],
        val.get("mlp", {}).get("accuracy", NAN),
        val.get("logreg", {}).get("accuracy", NAN),
    )


def main() -> None:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        raise SystemExit(
            f"usage: python benchmarks/dp_summary.py OUT_DIR (a benchmarks/dp_curve.sh folder); got {sys.argv[1:]}"
        )
    out = Path(sys.argv[1])
    rows: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    audits: dict[tuple[str, str], dict[str, float]] = {}
    above: dict[tuple[str, str, str], list[bool]] = {}  # (file, epsilon, attack) -> per site audit: above its bound?
    print(
        "| file | epsilon (target) | seed | MLP test acc | LR test acc | MLP validation acc | LR validation acc "
        "| local-only MLP | epsilon spent (max over sites) | sites |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, eps, seed, log in runs(out):
        metrics = log.with_suffix("") / "metrics.json"
        if not metrics.is_file():
            last = (log.read_text().strip().splitlines()[-1:] or [""])[0]
            print(
                f"| {name} | {eps} | {seed} "
                f"| stopped: {last.partition('error: ')[2][:150] or 'still running or killed'} | | | | | | |"
            )
            continue
        mt = json.loads(metrics.read_text())
        if not mt.get("rounds"):
            print(f"| {name} | {eps} | {seed} | stopped: {mt.get('stopped', {}).get('reason', '?')} | | | | | | |")
            continue
        mlp, lr, vmlp, vlr = scores(mt)
        local = [
            s["local_only"]["mlp"]["accuracy"]
            for s in mt["rounds"][-1]["sites"].values()
            if s.get("local_only", {}).get("mlp")
        ]
        spent = max((p["epsilon"] for p in mt.get("privacy", {}).values()), default=float("nan"))
        rows.setdefault((name, eps), []).append((mlp, lr, vmlp, vlr))
        worst = audits.setdefault((name, eps), {})
        for site in mt["rounds"][-1]["sites"].values():
            for key in AUDITS:
                value = site.get("audit", {}).get(key)
                if value is not None and value == value:  # not NaN
                    worst[key] = max(worst.get(key, 0.0), value)
                    bound = site.get("audit", {}).get(f"{key}_null95")
                    if bound is not None and bound == bound:
                        above.setdefault((name, eps, key), []).append(value > bound)
        print(
            f"| {name} | {eps if float(eps) > 0 else 'off'} | {seed} | {mlp:.3f} "
            f"| {lr:.3f} | {vmlp:.3f} | {vlr:.3f} | "
            f"{sum(local) / max(len(local), 1):.3f} | {spent:.3f} | {len(mt['rounds'][-1]['sites'])} |"
        )

    print("\nMean over seeds (cell-weighted over sites; choices are made on the validation columns):\n")
    print("| file | epsilon | seeds | MLP | LR | validation MLP | validation LR |")
    print("|---|---|---|---|---|---|---|")
    for (name, eps), vals in sorted(
        rows.items(), key=lambda kv: (kv[0][0], -float(kv[0][1]) if float(kv[0][1]) > 0 else -1e9)
    ):
        mlp, lr, vmlp, vlr = (sum(v[i] for v in vals) / len(vals) for i in range(4))
        print(
            f"| {name} | {eps if float(eps) > 0 else 'off'} | {len(vals)} | {mlp:.3f} | {lr:.3f} | {vmlp:.3f} "
            f"| {vlr:.3f} |"
        )

    print("\nMean over every run at each epsilon, all files together (what the paired screens compare):\n")
    print("| epsilon | runs | MLP | LR | validation MLP | validation LR |")
    print("|---|---|---|---|---|---|")
    for eps in sorted({e for _, e in rows}, key=float, reverse=True):
        every = [v for (_, e), vals in rows.items() if e == eps for v in vals]
        mlp, lr, vmlp, vlr = (sum(v[i] for v in every) / len(every) for i in range(4))
        print(f"| {eps if float(eps) > 0 else 'off'} | {len(every)} | {mlp:.3f} | {lr:.3f} | {vmlp:.3f} | {vlr:.3f} |")

    print("\nMembership audits, the largest over sites and seeds (AUC; 0.5 = nothing learned):\n")
    print("In brackets: site audits above their own chance bound (95th percentile without signal), of all scored.\n")
    print("| file | epsilon | " + " | ".join(AUDITS) + " |")
    print("|---|---|" + "---|" * len(AUDITS))
    for (name, eps), worst in sorted(audits.items()):
        cells = []
        for k in AUDITS:
            flags = above.get((name, eps, k))
            count = f" ({sum(flags)} of {len(flags)})" if flags else " (n/a)"
            cells.append(f"{worst[k]:.3f}{count}" if k in worst else "")
        print(f"| {name} | {eps if float(eps) > 0 else 'off'} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
