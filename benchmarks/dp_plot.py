"""The accuracy-privacy curve as a picture: test accuracy (MLP, logistic regression) against epsilon, one panel per
file, from a dp_curve.sh / dp_denoise_pair.sh arm folder; the "off" point (no DP) and centralized training come from
the benchmark's results of the same files (method ``scdd`` at k = 10, and ``centralized``). Every seed is a dot, the
mean over seeds a line; the dotted line is the issue's aim, 0.95 x centralized.

    python benchmarks/dp_plot.py OUT_DIR [--results benchmarks/results] [--out benchmarks/results/dp_curve.png]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from dp_summary import runs, scores

logger = logging.getLogger("dp_plot")
EVALUATORS = (("mlp", "MLP", "-"), ("logreg", "logistic regression", "--"))
AIM = 0.95  # issue 11: at epsilon 8, at least 0.95 x centralized


def _benchmark(results: Path, name: str, method: str, k: int | None, evaluator: str) -> list[float]:
    """Per-seed test accuracy of one row of the benchmark's results.json (empty when the file or row is missing)."""
    path = results / name / "results.json"
    if not path.is_file():
        return []
    for row in json.loads(path.read_text(encoding="utf-8"))["rows"]:
        if row["method"] == method and row.get("k") == k and row.get("evaluator", "mlp") == evaluator:
            return [float(v) for v in row["accuracy_per_seed"]]
    return []


def collect(out: Path) -> dict[str, dict[float, list[tuple[float, float]]]]:
    """Per file, per epsilon: (test MLP, test LR) of every finished run in ``out``."""
    found: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for name, eps, _seed, log in runs(out):
        metrics = log.with_suffix("") / "metrics.json"
        if not metrics.is_file():
            logger.warning("%s: no metrics.json (still running, or stopped): left out", log.with_suffix(""))
            continue
        mt = json.loads(metrics.read_text(encoding="utf-8"))
        if not mt.get("rounds") or float(eps) <= 0:
            continue
        mlp, lr, _, _ = scores(mt)
        found.setdefault(name, {}).setdefault(float(eps), []).append((mlp, lr))
    return found


def plot(found: dict[str, dict[float, list[tuple[float, float]]]], results: Path, path: Path) -> None:
    names = sorted(found)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        epsilons = sorted(found[name])
        xs = list(range(len(epsilons)))
        off_x = len(epsilons)  # "no DP" sits right of the largest epsilon
        for j, (evaluator, label, style) in enumerate(EVALUATORS):
            colour = f"C{j}"
            per_eps = [[v[j] for v in found[name][e]] for e in epsilons]
            for x, vals in zip(xs, per_eps, strict=True):
                ax.scatter([x] * len(vals), vals, s=12, color=colour, alpha=0.5)
            means = [float(np.mean(v)) for v in per_eps]
            n = min(len(v) for v in per_eps)
            ax.plot(xs, means, style, color=colour, marker="o", label=f"{label} (>= {n} seeds)")
            off = _benchmark(results, name, "scdd", 10, evaluator)
            if off:
                ax.scatter([off_x] * len(off), off, s=12, color=colour, alpha=0.5)
                ax.plot([xs[-1], off_x], [means[-1], float(np.mean(off))], ":", color=colour)
                ax.scatter([off_x], [float(np.mean(off))], color=colour, marker="s")
            central = _benchmark(results, name, "centralized", None, evaluator)
            if central and evaluator == "mlp":
                c = float(np.mean(central))
                ax.axhline(c, color="grey", lw=1)
                ax.axhline(AIM * c, color="grey", lw=1, ls=":")
                ax.text(0, c, " centralized MLP", va="bottom", fontsize=7, color="grey")
                ax.text(0, AIM * c, f" {AIM:g} x centralized (aim at epsilon 8)", va="bottom", fontsize=7, color="grey")
        ax.set_xticks([*xs, off_x], [f"{e:g}" for e in epsilons] + ["no DP"])
        ax.set_xlabel("epsilon (per site, cell level)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy, k = 10 (cell-weighted)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(path)  # a reader never sees half a picture


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, help="a dp_curve.sh / dp_denoise_pair.sh arm folder (NAME-epsE-seedS runs)")
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results"), help="the benchmark's results folder")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/dp_curve.png"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.runs.is_dir():
        raise SystemExit(
            f"{args.runs}: no such folder; pass the OUT_DIR of benchmarks/dp_curve.sh, or OUT_DIR/site of "
            "benchmarks/dp_denoise_pair.sh"
        )
    found = collect(args.runs)
    if not found:
        raise SystemExit(f"{args.runs}: no finished DP run (NAME-epsE-seedS/metrics.json) in it")
    plot(found, args.results, args.out)
    logger.info("wrote %s (%s)", args.out, ", ".join(f"{n}: {len(e)} epsilons" for n, e in sorted(found.items())))


if __name__ == "__main__":
    main()
