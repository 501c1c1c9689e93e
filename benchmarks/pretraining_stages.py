"""Which pretraining stage costs the federation its gap to pooled pretraining? (VALIDATION cells; a tuning script.)

    python benchmarks/pretraining_stages.py RUN_DIR DATA.h5ad --out OUT [--site-key batch]

RUN_DIR is a finished federated run of DATA (``scdd simulate DATA --k 10 --rounds 1 --set seed=S ...``). From its
plan and its sites' training cells (the same splits) this writes two ``pretrained-path`` folders:

- ``pooled/``: VAE and SCDG trained on all sites' pooled training cells (``PretrainConfig`` defaults, as the
  benchmark's ``scdd_pooled``);
- ``hybrid/``: the run's FedAvg VAE with an SCDG trained on the pooled training cells' latents of that VAE;

then distils and scores each of them, and the run's own FedAvg models (``federated``), through the shipped
ServerApp / ClientApp with ``pretrained-path`` (same seed, k and splits), and prints their validation accuracy.
hybrid close to pooled: the SCDG stage holds the gap; hybrid close to federated: the VAE stage does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from client.site import load_site, resolve_source
from shared.checkpoint import load_model, save_model
from shared.fitting import encode, fit_scdg, set_latent_stats
from shared.io import write_json
from shared.pretrain import PretrainConfig, new_models, pretrain
from shared.protocol import Plan

logger = logging.getLogger("pretraining_stages")


def _pooled_training_cells(run: Path, plan: Plan, cache: Path) -> tuple[sp.csr_matrix, np.ndarray]:
    """Every site's training cells of the plan's classes (the run's splits), stacked."""
    cfg = json.loads((run / "config.json").read_text())["run_config"]
    sites = json.loads((run / "metrics.json").read_text())["sites"]
    cache.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for part in range(len(sites)):
        source = resolve_source({"partition-id": part, "num-partitions": len(sites)}, cfg)
        site = load_site(source, plan.spec, plan.genes, cache=cache)
        y, ok = site.global_labels(plan.classes)
        train = site.train_idx[ok[site.train_idx]]
        xs.append(site.X[train])
        ys.append(y[train])
    return sp.vstack(xs).tocsr(), np.concatenate(ys)


def _save(folder: Path, vae: torch.nn.Module, scdg: torch.nn.Module, plan: Plan) -> Path:
    save_model(vae, folder / "vae.pt")
    save_model(scdg, folder / "scdg.pt")
    write_json(folder / "plan.json", plan.to_json())  # last: a folder with plan.json is complete
    return folder


def build(run: Path, out: Path) -> dict[str, Path]:
    """The pooled and hybrid ``pretrained-path`` folders for ``run`` (and the run's own)."""
    cfg = json.loads((run / "config.json").read_text())["run_config"]
    seed = int(cfg.get("seed", 0))
    plan = Plan.from_json(json.loads((run / "plan.json").read_text()))
    X, y = _pooled_training_cells(run, plan, out / "cache")
    fed_vae = load_model(run / "pretrained" / "vae.pt")
    pre = PretrainConfig(latent_dim=fed_vae.config.latent_dim).with_seed(seed)
    pooled = pretrain(X, y, len(plan.classes), pre)
    torch.manual_seed(seed)
    _, scdg = new_models(X.shape[1], len(plan.classes), fed_vae.config.latent_dim)
    Z = encode(fed_vae, X)
    set_latent_stats(scdg, Z.mean(0), Z.std(0))
    fit_scdg(scdg, Z, y, pre.scdg)
    return {
        "federated": run / "pretrained",
        "pooled": _save(out / "pooled", pooled.vae, pooled.scdg, plan),
        "hybrid (FedAvg VAE + pooled SCDG)": _save(out / "hybrid", fed_vae, scdg, plan),
    }


def score(data: Path, run: Path, models: Path, out: Path, site_key: str) -> tuple[float, float]:
    """Validation MLP / LR accuracy of distilling with ``models`` (the run's seed and k, one round)."""
    cfg = json.loads((run / "config.json").read_text())["run_config"]
    cmd = [
        sys.executable, "-m", "server.cli", "simulate", str(data), "--site-key", site_key,
        "--k", str(cfg.get("cells-per-class", 10)), "--rounds", "1",
        "--set", "report=false", "--set", f"seed={cfg.get('seed', 0)}", "--set", f"pretrained-path={models}",
        "--out", str(out),
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    with (out.parent / f"{out.name}.log").open("w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    v = json.loads((out / "metrics.json").read_text())["rounds"][-1]["aggregate"]["validation"]["cell_weighted"]
    return v["mlp"]["accuracy"], v["logreg"]["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished federated run of DATA")
    ap.add_argument("data", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--site-key", default="batch")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name, models in build(args.run, args.out).items():
        mlp, lr = score(args.data, args.run, models, args.out / f"run-{name.split()[0]}", args.site_key)
        print(f"{name:<34} VALIDATION MLP {mlp:.3f}  LR {lr:.3f}", flush=True)


if __name__ == "__main__":
    main()
