"""Federated runs (FedAvg pretraining, in-process Grid) on every multi-site file, against the pooled benchmark.

Usage: python benchmarks/federation.py [--data ../shared/data] [--k 10] [--rounds 2] [--out benchmarks/federation]
                                      [--results benchmarks/results] [--set KEY=VALUE ...]

For each file whose obs["batch"] names two or more sites, runs `scdd simulate` with the app's
default run config (the same ServerApp and ClientApp as `flwr run`, without Ray), then compares the
cell-weighted MLP accuracy per round with the `scdd` (pooled pretraining) and `local` rows of
`scdd benchmark` in --results. A file whose run finished is not run again (delete its folder to
redo it). Writes OUT/SUMMARY.md and OUT/summary.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py

ROOT = Path(__file__).resolve().parents[1]


def multi_site(path: Path, site_key: str) -> bool:
    """Whether obs[site_key] holds two or more values (read from the h5ad without loading X)."""
    with h5py.File(path, "r") as f:
        obs = f["obs"]
        if site_key not in obs:
            return False
        col = obs[site_key]
        n = len(col["categories"]) if isinstance(col, h5py.Group) else len(set(col[()]))
    return n >= 2


def run_one(path: Path, out: Path, k: int, rounds: int, overrides: list[str]) -> dict:
    """`scdd simulate` on one file (skipped when its metrics.json already holds every round)."""
    metrics = out / "metrics.json"
    if metrics.is_file() and len(json.loads(metrics.read_text())["rounds"]) == rounds:
        print(f"{path.stem}: already done ({out})", flush=True)
        return json.loads(metrics.read_text())
    cmd = [sys.executable, "-m", "server.cli", "simulate", "--data", str(path), "--site-key", "batch", "--label-key", "cell_type",
           "--k", str(k), "--rounds", str(rounds), "--set", "report=false", "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{path.stem}.log", "w", encoding="utf-8") as log:
        res = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if res.returncode != 0:
        msg = f"{path.stem}: scdd simulate exited {res.returncode}; see {out.parent / (path.stem + '.log')}"
        raise SystemExit(msg)
    print(f"{path.stem}: federated run in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(metrics.read_text())


def pooled_rows(results: Path, name: str, k: int) -> tuple[float | None, float | None, int | None]:
    """(scdd at k, local, seeds) MLP accuracy from `scdd benchmark`'s results.json, where it exists."""
    path = results / name / "results.json"
    if not path.is_file():
        return None, None, None
    rows = [r for r in json.loads(path.read_text())["rows"] if r["evaluator"] == "mlp"]
    scdd = next((r["accuracy_mean"] for r in rows if r["method"] == "scdd" and r["k"] == k), None)
    local = next((r["accuracy_mean"] for r in rows if r["method"] == "local"), None)
    return scdd, local, json.loads(path.read_text()).get("seeds")


def fmt(v: float | None) -> str:
    """Three decimals, or a dash."""
    return "—" if v is None else f"{v:.3f}"


def main() -> int:
    """Run every multi-site file and print the comparison."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "federation"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    files = [f for f in sorted(Path(args.data).glob("*.h5ad")) if multi_site(f, "batch")]
    if not files:
        print(f"no multi-site .h5ad (obs['batch'] with >= 2 values) in {args.data}", file=sys.stderr)
        return 1
    out = Path(args.out)
    rows = []
    for f in files:
        m = run_one(f, out / f.stem, args.k, args.rounds, args.overrides)
        acc = [r["aggregate"]["cell_weighted"]["mlp"]["accuracy"] for r in m["rounds"]]
        mia = [r["aggregate"]["audit"]["seed_mia"] for r in m["rounds"]]
        pooled, local, _ = pooled_rows(Path(args.results), f.stem, args.k)
        up = m["upload_bytes"]
        rows.append({"dataset": f.stem, "sites": len(m["sites"]), "accuracy_per_round": acc, "seed_mia_last": mia[-1],
                     "pooled_scdd": pooled, "local": local, "pretrain_seconds": m["phase_seconds"].get("pretrain"),
                     "distill_bytes_per_site_per_round": max(v.get("train.distill", 0) for v in up.values()) / len(acc),
                     "pretrain_bytes_per_site": max(v.get("train.pretrain", 0) for v in up.values())})
    lines = [f"# Federated (FedAvg pretraining) vs pooled pretraining, k={args.k}", "",
             f"`python benchmarks/federation.py --k {args.k} --rounds {args.rounds}`" + "".join(f" --set {o}" for o in args.overrides)
             + "; MLP accuracy on every site's held-out real cells (cell-weighted); `pooled scdd` and `local` come from "
             "`scdd benchmark` (benchmarks/results).", "",
             "| dataset | sites | " + " | ".join(f"round {i + 1}" for i in range(args.rounds))
             + " | pooled scdd | federated − pooled | local | seed MIA | pretrain s | distill bytes/site/round |",
             "|---|---|" + "---|" * args.rounds + "---|---|---|---|---|---|"]
    for r in rows:
        last = r["accuracy_per_round"][-1]
        gap = None if r["pooled_scdd"] is None else last - r["pooled_scdd"]
        lines.append(f"| {r['dataset']} | {r['sites']} | " + " | ".join(fmt(a) for a in r["accuracy_per_round"])
                     + f" | {fmt(r['pooled_scdd'])} | {'—' if gap is None else f'{gap:+.3f}'} | {fmt(r['local'])} | {r['seed_mia_last']:.3f}"
                     f" | {r['pretrain_seconds']:.0f} | {r['distill_bytes_per_site_per_round']:.0f} |")
    text = "\n".join(lines) + "\n"
    (out / "SUMMARY.md").write_text(text, encoding="utf-8")
    (out / "summary.json").write_text(json.dumps({"k": args.k, "rounds": args.rounds, "overrides": args.overrides, "rows": rows}, indent=2) + "\n",
                                      encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
