"""Summarise benchmark results across datasets: accuracy per method and k, federation parity, gains per site, bytes,
audit.

Usage: python benchmarks/summarize.py benchmarks/results [WORK]   (writes SUMMARY.md there and prints it)
WORK: the `scdd benchmark --work` folder of the same runs (per-site local-only gains are read from its
federated runs' metrics.json); without it that table is left out.
       python benchmarks/summarize.py --gains WORK   (prints the per-site gains table of every file under WORK only)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

K_FREE = ("local", "centralized", "fedavg_mlp")
SATURATED = 0.995  # a file whose centralized MLP scores at least this is saturated (a tie counts as a win there)


def load(root: Path) -> dict[str, list[dict]]:
    """dataset -> rows of its results.json."""
    return {p.parent.name: json.loads(p.read_text())["rows"] for p in sorted(root.glob("*/results.json"))}


def lookup(rows: list[dict], method: str, k: int | None, ev: str = "mlp") -> dict | None:
    """The row of (method, k, evaluator), or None."""
    return next((r for r in rows if r["method"] == method and r["k"] == k and r["evaluator"] == ev), None)


def summary(results: dict[str, list[dict]], ev: str = "mlp") -> str:
    """Markdown: per-dataset table and cross-dataset means."""
    ks = sorted({r["k"] for rows in results.values() for r in rows if r["k"] is not None})
    methods = list(dict.fromkeys(r["method"] for rows in results.values() for r in rows))
    cols = [(m, k) for m in methods for k in ([None] if m in K_FREE else ks)]
    head = "| dataset | " + " | ".join(f"{m}" + (f" k={k}" if k else "") for m, k in cols) + " |"
    lines = [f"## {ev} accuracy per dataset", "", head, "|---" * (len(cols) + 1) + "|"]
    means: dict[tuple[str, int | None], list[float]] = {c: [] for c in cols}
    for name, rows in results.items():
        vals = []
        for c in cols:
            r = lookup(rows, *c, ev)
            vals.append(f"{r['accuracy_mean']:.3f}" if r else "")
            if r:
                means[c].append(r["accuracy_mean"])
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    lines.append(
        f"| **mean ({len(results)} sets)** | "
        + " | ".join(f"**{np.mean(v):.3f}**" if v else "" for v in means.values())
        + " |"
    )
    lines += [
        "",
        f"## {ev}: mean over datasets, ± std over seeds (each seed's mean over datasets)",
        "",
        "| method | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---" * (len(ks) + 1) + "|",
    ]
    for m in methods:
        cells = []
        for k in [None] if m in K_FREE else ks:
            per_seed = [lookup(rows, m, k, ev) for rows in results.values()]
            seeds = [r["accuracy_per_seed"] for r in per_seed if r and "accuracy_per_seed" in r]
            n = min((len(x) for x in seeds), default=0)
            if not seeds or n == 0:
                cells.append("")
                continue
            by_seed = np.mean([x[:n] for x in seeds], axis=0)
            cells.append(
                f"{by_seed.mean():.3f} ± {by_seed.std():.3f}"
                + ("" if len(seeds) == len(results) else f" ({len(seeds)} sets)")
            )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## scdd vs dm and centralized (MLP), bytes and seconds per site",
        "",
        "| dataset | k | scdd | dm | gap to centralized | bytes scdd/dm | seconds scdd/dm |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        cen = lookup(rows, "centralized", None, ev)
        for k in ks:
            s, d = lookup(rows, "scdd", k, ev), lookup(rows, "dm", k, ev)
            if not (s and d and cen):
                continue
            lines.append(
                f"| {name} | {k} | {s['accuracy_mean']:.3f} | {d['accuracy_mean']:.3f} "
                f"| {cen['accuracy_mean'] - s['accuracy_mean']:+.3f} | "
                f"1/{d['upload_bytes_per_site'] / s['upload_bytes_per_site']:.1f} "
                f"| {s['distill_seconds']:.1f}/{d['distill_seconds']:.1f} |"
            )
    return "\n".join(lines) + "\n"


AUDIT = ("seed_mia", "seed_mia_max", "population_mia", "density_mia", "dcr_share")


def audit_table(results: dict[str, list[dict]]) -> str:
    """Markdown: the privacy audit per method and k, mean over datasets (max over datasets in brackets)."""
    ks = sorted({r["k"] for rows in results.values() for r in rows if r["k"] is not None})
    methods = [m for m in dict.fromkeys(r["method"] for rows in results.values() for r in rows) if m not in K_FREE]
    lines = [
        "## Privacy audit (0.5 = no signal; mean over datasets, [max over datasets])",
        "",
        "| method | k | seed MIA | seed MIA, worst site | population MIA | density MIA | DCR share |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        for k in ks:
            rows = [lookup(r, m, k, "mlp") for r in results.values()]
            rows = [r for r in rows if r and "seed_mia" in r]
            if not rows:
                continue
            vals = []
            for key in AUDIT:
                v = np.array([r[key] for r in rows], dtype=float)
                v = v[np.isfinite(v)]
                vals.append(f"{v.mean():.3f} [{v.max():.3f}]" if v.size else "n/a")
            lines.append(f"| {m} | {k} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def _acc(rows: list[dict], method: str, k: int | None, ev: str = "mlp") -> float:
    r = lookup(rows, method, k, ev)
    return float(r["accuracy_mean"]) if r else float("nan")


def parity(results: dict[str, list[dict]], multi_site: set[str]) -> str:
    """Markdown: the shipped federation against the pooled upper bound, centralized, real cells and FedAvg of the
    MLP."""
    lines = [
        "## Federation parity (MLP, k = 10 unless said; LR = logistic regression)",
        "",
        "| dataset | sites | scdd (federated) | scdd_pooled | fed - pooled | centralized | fed / centralized "
        "| LR scdd | LR random | "
        "scdd vs dm, random k = 1 | fedavg_mlp | weights MB: scdd / fedavg_mlp |",
        "|---" * 12 + "|",
    ]
    ratios = []
    for name, rows in results.items():
        fed, pooled, cen = _acc(rows, "scdd", 10), _acc(rows, "scdd_pooled", 10), _acc(rows, "centralized", None)
        if np.isnan(fed):
            continue
        sat = " (saturated)" if cen >= SATURATED else ""
        if name in multi_site or name.startswith(("cbmc", "pbmc4k")):
            ratios.append(fed / cen)
        s10, f10 = lookup(rows, "scdd", 10), lookup(rows, "fedavg_mlp", None)
        mb = (
            f"{s10['pretrain_upload_bytes_per_site'] / 1e6:.1f} / {f10['upload_bytes_per_site'] / 1e6:.1f}"
            if s10 and f10 and "pretrain_upload_bytes_per_site" in s10
            else ""
        )
        lines.append(
            f"| {name}{sat} | {'by batch' if name in multi_site else 'Dirichlet'} | {fed:.3f} | {pooled:.3f} "
            f"| {fed - pooled:+.3f} | {cen:.3f} | "
            f"{fed / cen:.3f} | {_acc(rows, 'scdd', 10, 'logreg'):.3f} | {_acc(rows, 'random', 10, 'logreg'):.3f} | "
            f"{_acc(rows, 'scdd', 1):.3f} vs {_acc(rows, 'dm', 1):.3f}, {_acc(rows, 'random', 1):.3f} "
            f"| {_acc(rows, 'fedavg_mlp', None):.3f} | {mb} |"
        )
    if ratios:
        lines += [
            "",
            "Mean of fed / centralized over the multi-site files and the Dirichlet splits of cbmc and pbmc4k: "
            f"{np.mean(ratios):.3f} "
            f"({len(ratios)} files).",
        ]
    return "\n".join(lines) + "\n"


def site_gains(work: Path, results: dict[str, list[dict]], k: int = 10) -> str:
    """Markdown: per site, the federated MLP (scdd, k) and that MLP fine-tuned at the site against the same MLP trained
    on the site's own cells; mean over seeds (the seeds each site has), then how many sites gain."""
    gains: dict[str, list[float]] = {"federated": [], "fine-tuned": []}
    lines = [
        f"## What each site gains by joining (MLP on the site's test cells, scdd k = {k}, mean over seeds)",
        "",
        "| dataset | site | federated | local-only | gain | fine-tuned at the site | gain, fine-tuned |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in results:
        per: dict[str, list[tuple[float, float, float]]] = {}
        for m in sorted(work.glob(f"{name}/seed*/scdd-k{k}/metrics.json")):
            rounds = json.loads(m.read_text())["rounds"]
            if not rounds:  # a run still in progress (or stopped before its first evaluation)
                continue
            for site, v in rounds[-1]["sites"].items():
                per.setdefault(site, []).append(
                    (
                        v["scores"]["mlp"]["accuracy"],
                        v.get("local_only", {}).get("mlp", {}).get("accuracy", float("nan")),
                        v.get("fine_tuned", {}).get("mlp", {}).get("accuracy", float("nan")),
                    )
                )
        for site, vals in sorted(per.items()):
            fed, loc, tun = (
                np.nanmean([v[i] for v in vals]) if any(np.isfinite(v[i]) for v in vals) else np.nan for i in range(3)
            )
            lines.append(
                f"| {name} | {site} | {fed:.3f} | {loc:.3f} | {fed - loc:+.3f} | {tun:.3f} | {tun - loc:+.3f} | "
                f"{len(vals)} |"
            )
            gains["federated"].append(fed - loc)
            gains["fine-tuned"].append(tun - loc)
    lines[2] += " seeds |"
    lines[3] += "---|"
    lines.append("")
    for what, g in gains.items():
        v = np.array([x for x in g if np.isfinite(x)])
        if v.size:
            lines.append(
                f"- {what}: at least local-only at {int((v >= 0).sum())} of {v.size} sites (ties included), "
                f"mean gain {v.mean():+.3f}, smallest {v.min():+.3f}"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    """Entry point."""
    if len(sys.argv) == 3 and sys.argv[1] == "--gains":
        work = Path(sys.argv[2])
        names = sorted({p.parts[-4] for p in work.glob("*/seed*/scdd-k10/metrics.json")})
        if not names:
            print(f"no NAME/seedS/scdd-k10/metrics.json under {work}")
            return 1
        print(site_gains(work, {n: [] for n in names}))
        return 0
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    work = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    results = load(root)
    multi = {
        p.parent.name
        for p in root.glob("*/results.json")
        if len(json.loads(p.read_text()).get("sites", [])) >= 2
        and not json.loads(p.read_text())["sites"][0].startswith("site")
    }
    if not results:
        print(f"no */results.json under {root}")
        return 1
    text = (
        "# Benchmark summary\n\n"
        + (parity(results, multi) + "\n" if any(lookup(r, "scdd_pooled", 10) for r in results.values()) else "")
        + (site_gains(work, results) + "\n" if work is not None else "")
        + summary(results, "mlp")
        + "\n"
        + summary(results, "logreg")
        + "\n"
        + summary(results, "knn")
        + "\n"
        + audit_table(results)
    )
    (root / "SUMMARY.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
