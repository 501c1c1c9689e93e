"""The benchmark's federated rows: the shipped ServerApp / ClientApp over the in-process grid, and FedAvg of the MLP.

``federate`` runs one federation exactly as ``scdd simulate`` does (same run config keys, same
phases) and reads back what the benchmark scores: the fused synthetic cells of the last round, the
sites' privacy audits, bytes and seconds. ``fedavg_mlp`` is the classic federated answer a
consortium would compare against: FedAvg of the evaluation MLP on the sites' real training cells.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import torch

from server.averaging import fedavg
from server.cli.simulation import app_config_defaults, count_sites, run_in_process
from server.config import FederationConfig
from shared.audit import AUDIT_KEYS, Audit
from shared.checkpoint import save_model
from shared.evaluation import MLPTrainConfig, train_mlp
from shared.io import write_json
from shared.models import MLPClassifier, MLPConfig
from shared.pretrain import Pretrained
from shared.protocol import MSG_PRETRAIN, Plan, SiteSpec
from shared.sites import Federation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FederatedResult:
    """What the benchmark reads from one federated run."""

    X: np.ndarray  # the last round's fused synthetic cells
    labels: np.ndarray  # their global class ids (the benchmark's class order)
    audits: list[Audit]  # one per site, last round
    distill_seconds: float  # mean over sites, last round
    upload_bytes: float  # codes uploaded per site in the last round (mean over sites)
    pretrain_upload_bytes: (
        float  # model weights uploaded per site during pretraining (mean over sites; 0 with pretrained-path)
    )
    pretrain_rounds: int
    genes: tuple[str, ...]
    run_dir: Path


def run_config(
    path: Path,
    *,
    seed: int,
    k: int,
    out: Path,
    label_key: str,
    site_key: str,
    n_sites: int,
    n_genes: int,
    test_fraction: float,
    val_fraction: float,
    overrides: Mapping[str, Any],
) -> dict[str, Any]:
    """The run config of one benchmark federation: the app's defaults, the benchmark's split, then ``overrides``."""
    return {
        **app_config_defaults(),
        "sim-data-path": str(path.resolve()),
        "sim-site-key": site_key,
        "sim-num-sites": n_sites,
        "label-key": label_key,
        "n-genes": n_genes,
        "test-fraction": test_fraction,
        "val-fraction": val_fraction,
        "seed": seed,
        "cells-per-class": k,
        "out-dir": str(out.parent.resolve()),
        "run-id": out.name,
        "report": False,
        **overrides,
    }


def federate(run_cfg: Mapping[str, Any], *, classes: Sequence[str], cache: Path) -> FederatedResult:
    """Run the federation of ``run_cfg`` in this process; read back its last round."""
    cfg = FederationConfig.from_run_config(run_cfg)
    n = count_sites(Path(str(run_cfg["sim-data-path"])), site_key=cfg.sim_site_key, num_sites=cfg.sim_num_sites)
    cache.mkdir(parents=True, exist_ok=True)
    run_in_process(run_cfg, num_nodes=n, node_configs=[{"cache-dir": str(cache)}] * n)
    return read_run(cfg.run_dir("benchmark"), classes=classes, label_key=cfg.label_key)


def read_run(run_dir: Path, *, classes: Sequence[str], label_key: str) -> FederatedResult:
    """A finished run's fused synthetic cells (labels as ids into ``classes``), audits, bytes and seconds."""
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    if "stopped" in metrics or not metrics.get("rounds"):
        msg = f"the federation in {run_dir} did not finish: {metrics.get('stopped', 'no round completed')}"
        raise RuntimeError(msg)
    syn = ad.read_h5ad(run_dir / "synthetic.h5ad")
    X = np.asarray(syn.X.toarray() if hasattr(syn.X, "toarray") else syn.X, dtype=np.float32)
    lookup = {c: i for i, c in enumerate(classes)}
    labels = np.array([lookup[str(c)] for c in syn.obs[label_key]], dtype=np.int64)
    last = metrics["rounds"][-1]
    sites = sorted(last["sites"])
    audits = [  # a run of a release before the chance bounds lacks them: NaN
        Audit(**{k: float(last["sites"][s]["audit"].get(k, float("nan"))) for k in AUDIT_KEYS}) for s in sites
    ]
    upload = metrics.get("upload_bytes", {})
    pre_bytes = [upload.get(s, {}).get(MSG_PRETRAIN, 0) for s in sites]
    plan = json.loads((run_dir / "plan.json").read_text(encoding="utf-8"))
    pre = metrics.get("pretrain", {})
    return FederatedResult(
        X,
        labels,
        audits,
        float(np.mean([last["distill_seconds"][s] for s in sites])),
        float(np.mean([last["distill_upload_bytes"][s] for s in sites])),
        float(np.mean(pre_bytes)),
        int(pre.get("schedule", {}).get("rounds", 0)),
        tuple(plan["genes"]),
        run_dir,
    )


def save_pooled(pre: Pretrained, fed: Federation, spec: SiteSpec, out: Path) -> Path:
    """Models pretrained on pooled cells as a ``pretrained-path`` directory for the benchmark's plan."""
    save_model(pre.vae, out / "vae.pt")
    save_model(pre.scdg, out / "scdg.pt")
    write_json(out / "plan.json", Plan(fed.genes, fed.classes, spec).to_json())
    return out


def pretrain_rounds(overrides: Mapping[str, Any]) -> int:
    """The federation's FedAvg rounds under ``overrides`` (fedavg_mlp gets the same number of rounds)."""
    return FederationConfig.from_run_config({**app_config_defaults(), **overrides}).num_pretrain_rounds


def fedavg_mlp(fed: Federation, *, rounds: int, mlp: MLPTrainConfig, seed: int) -> tuple[MLPClassifier, float]:
    """FedAvg of the evaluation MLP on each site's real training cells; returns the model and bytes uploaded per site.

    Every site starts each round from the global weights and takes ceil(mlp.steps(n_site) / rounds)
    local steps (the whole schedule gives each site the step budget the MLP rule gives its own
    cells); the server averages by training cells. Uploads: the weights, once per round and site.
    """
    torch.manual_seed(seed)
    sizes = [len(fed.train(i)[1]) for i in range(len(fed.sites))]
    model = MLPClassifier(MLPConfig(n_genes=len(fed.genes), n_classes=len(fed.classes)))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    for rnd in range(rounds):
        updates = []
        for i in range(len(fed.sites)):
            X, y = fed.train(i)
            local = train_mlp(
                X,
                y,
                len(fed.classes),
                seed=seed * 7919 + 1000 * i + rnd,
                cfg=mlp,
                init=state,
                steps=max(1, math.ceil(mlp.steps(sizes[i]) / rounds)),
            )
            updates.append({k: v.detach().numpy() for k, v in local.state_dict().items()})
        state = {k: torch.from_numpy(np.array(v)) for k, v in fedavg(updates, sizes).items()}
    model.load_state_dict(state)
    model.eval()
    return model, float(rounds * nbytes)
