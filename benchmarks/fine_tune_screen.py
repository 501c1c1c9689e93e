"""How a site should adapt the federation's MLP to its own cells: a screen on VALIDATION cells (a tuning script never
reads test scores).

    python benchmarks/fine_tune_screen.py RUN_DIR [RUN_DIR ...]

RUN_DIR is a finished `scdd simulate` run (its plan.json, config.json, mlp.pt and synthetic.h5ad). Each site is
loaded as the run loaded it (same file, split and seed, from the site cache when it is there) and, per site, these
MLPs are scored on its validation cells: the federated MLP as it came; local-only (the local-only rule from a random
start, ``MLPTrainConfig``); the federated MLP trained further on the site's training cells by that rule, at its
learning rate and at a tenth of it; the same rule on the site's cells plus the fused synthetic cells, from the federated
weights and from a random start. Prints one line per site and the mean and smallest gain over local-only per variant.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from client.site import SiteData, cache_dir, load_site, resolve_source
from shared.checkpoint import build_model, load_state
from shared.evaluation import MLPTrainConfig, predict_mlp, train_mlp
from shared.protocol import Plan


def _variants(
    shared: torch.nn.Module, site: SiteData, plan: Plan, X_syn: sp.csr_matrix, y_syn: np.ndarray
) -> dict[str, float]:
    """Validation accuracy of every variant at one site."""
    y, ok = site.global_labels(plan.classes)
    train, val = site.train_idx[ok[site.train_idx]], site.val_idx[ok[site.val_idx]]
    X_train, X_val, y_val = site.X[train], site.X[val], y[val]
    X_joint, y_joint = sp.vstack([X_train, X_syn]).tocsr(), np.concatenate([y[train], y_syn])
    rule = MLPTrainConfig()

    def fit(X: sp.csr_matrix, labels: np.ndarray, cfg: MLPTrainConfig, init: bool) -> float:
        start = {k: v.detach().clone() for k, v in shared.state_dict().items()} if init else None
        model = train_mlp(X, labels, len(plan.classes), seed=0, cfg=cfg, init=start)
        return float((predict_mlp(model, X_val) == y_val).mean())

    return {
        "federated": float((predict_mlp(shared, X_val) == y_val).mean()),
        "local-only": fit(X_train, y[train], rule, False),
        "fine-tuned, lr": fit(X_train, y[train], rule, True),
        "fine-tuned, lr / 10": fit(X_train, y[train], replace(rule, lr=rule.lr / 10), True),
        "own + synthetic, from federated": fit(X_joint, y_joint, rule, True),
        "own + synthetic, random start": fit(X_joint, y_joint, rule, False),
    }


def screen(run: Path) -> dict[str, list[float]]:
    """Per variant, each site's validation accuracy minus local-only's; prints a line per site."""
    plan = Plan.from_json(json.loads((run / "plan.json").read_text(encoding="utf-8")))
    run_config = json.loads((run / "config.json").read_text(encoding="utf-8"))["run_config"]
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    saved = torch.load(run / "mlp.pt", weights_only=False)
    shared = build_model("mlp", saved["config"])
    load_state(shared, saved["state_dict"])
    syn = ad.read_h5ad(run / "synthetic.h5ad")
    lookup = {c: i for i, c in enumerate(plan.classes)}
    X_syn = sp.csr_matrix(syn.X, dtype=np.float32)
    y_syn = np.array([lookup[c] for c in syn.obs[str(run_config["label-key"])].astype(str)])
    gains: dict[str, list[float]] = {}
    for partition in range(len(metrics["rounds"][-1]["sites"])):
        source = resolve_source({"partition-id": partition}, run_config)
        site = load_site(source, plan.spec, plan.genes, cache=cache_dir({}))
        acc = _variants(shared, site, plan, X_syn, y_syn)
        print(
            f"{run.name} {site.name} ({site.val_idx.size} validation cells): "
            + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()),
            flush=True,
        )
        for k, v in acc.items():
            gains.setdefault(k, []).append(v - acc["local-only"])
    return gains


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    for run in args.runs:
        missing = [
            f
            for f in ("plan.json", "config.json", "metrics.json", "mlp.pt", "synthetic.h5ad")
            if not (run / f).is_file()
        ]
        if missing:
            raise SystemExit(
                f"{run}: not a finished run (no {', '.join(missing)}); pass an `scdd simulate --out` folder"
            )
    per_file = {run: screen(run) for run in args.runs}
    print("| variant | " + " | ".join(r.name for r in per_file) + " | mean | sites below local-only |")
    print("|---" * (len(per_file) + 3) + "|")
    for variant in next(iter(per_file.values())):
        means = [np.mean(g[variant]) for g in per_file.values()]
        below = sum(int(v < 0) for g in per_file.values() for v in g[variant])
        total = sum(len(g[variant]) for g in per_file.values())
        print(
            f"| {variant} | "
            + " | ".join(f"{m:+.3f}" for m in means)
            + f" | {np.mean(means):+.3f} | {below} of {total} |"
        )


if __name__ == "__main__":
    main()
