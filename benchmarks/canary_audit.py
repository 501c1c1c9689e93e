"""Canary membership audit of a federated run: plant strongly perturbed cells in one site, score them against held-out
ones.

    python benchmarks/canary_audit.py DATA.h5ad --site ctrl101 --out runs/canary-eps8
        [--canaries 40] [--set dp-epsilon=8 ...]

Canaries are copies of the site's own cells with the counts of 60 random genes (among the 2,000 most
detected) set to 30: each is unlike any real cell, so a release that remembers one can be told
apart. Half of them are planted in the site's data (those that its split puts among the training
cells are the members), the other half are never shown to anyone (non-members). After the run,
three attacks score membership from what the site released, each an AUC of planted-in-training vs
held-out canaries (0.5 = nothing learned):

- ``synthetic``: minus the distance to the closest cell of the fused synthetic set (decoded codes);
- ``latent``: minus the distance of the canary's latent (the released VAE's encoder) to the closest decoded code latent;
- ``reconstruction``: minus the released VAE's reconstruction error of the canary (a loss attack on the weights).

``canary_mia`` (the largest) joins the site's ``audit`` block of the run's metrics.json with its chance bound
``canary_mia_null95``: the 95th percentile of the largest of the three AUCs when which canaries were planted is drawn
at random (``NULL_PERMUTATIONS`` times, the same draw for the three attacks); above it, the release remembers its
canaries at the 5 % level. The three AUCs, the bound and the canary counts go to canary_audit.json in the run
directory.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from server.cli.simulation import parse_overrides, simulate_file
from shared.audit import NULL_PERMUTATIONS
from shared.checkpoint import load_model
from shared.data import prepare_site, read_h5ad
from shared.io import write_json

logger = logging.getLogger("canary_audit")
GENES_PER_CANARY = 60
CANARY_COUNT = 30.0


def make_canaries(adata: ad.AnnData, rows: np.ndarray, rng: np.random.Generator) -> ad.AnnData:
    """Copies of ``rows`` with GENES_PER_CANARY random well-detected genes set to CANARY_COUNT counts."""
    X = adata.X[rows]
    X = X.toarray() if sp.issparse(X) else np.array(X)
    detected = np.asarray((adata.X > 0).sum(0)).ravel()
    pool = np.argsort(-detected)[:2000]
    for i in range(len(rows)):
        X[i, rng.choice(pool, GENES_PER_CANARY, replace=False)] = CANARY_COUNT
    out = ad.AnnData(sp.csr_matrix(X.astype(np.float32)), obs=adata.obs.iloc[rows].copy(), var=adata.var.copy())
    out.obs_names = [f"canary-{i}" for i in range(len(rows))]
    return out


def _auc(members: np.ndarray, others: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.ones(len(members)), np.zeros(len(others))], np.r_[members, others]))


def _min_dist(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    return (
        torch.cdist(torch.as_tensor(A, dtype=torch.float32), torch.as_tensor(B, dtype=torch.float32))
        .min(1)
        .values.numpy()
    )


def max_null_bound(attacks: dict[str, tuple[np.ndarray, np.ndarray]], seed: int, q: float = 0.95) -> float:
    """The ``q`` quantile of the largest AUC over ``attacks`` ((member scores, non-member scores) each) when membership
    is exchanged at random, one permutation for all attacks per draw (their scores are of the same canaries)."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(attacks.values()))[0])
    pooled = [np.r_[m, o] for m, o in attacks.values()]
    draws = []
    for _ in range(NULL_PERMUTATIONS):
        order = rng.permutation(len(pooled[0]))
        draws.append(max(_auc(s[order[:n]], s[order[n:]]) for s in pooled))
    return float(np.quantile(draws, q))


def scores(run_dir: Path, members: np.ndarray, others: np.ndarray, site: str) -> dict[str, float]:
    """The three attacks' AUCs, their largest (``canary_mia``) and its chance bound (rows of members / others:
    log-normalised canaries on the plan genes)."""
    attacks = attack_scores(run_dir, members, others, site)
    out = {name: _auc(m, o) for name, (m, o) in attacks.items()}
    return out | {"canary_mia": max(out.values()), "canary_mia_null95": max_null_bound(attacks, seed=0)}


@torch.no_grad()
def attack_scores(
    run_dir: Path, members: np.ndarray, others: np.ndarray, site: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per attack, the scores of the member and of the held-out canaries (higher: more member-like)."""
    # scdg.pt is loaded only to check that the run is whole: no attack uses it
    vae, _scdg = load_model(run_dir / "vae.pt"), load_model(run_dir / "scdg.pt")
    syn = ad.read_h5ad(run_dir / "synthetic.h5ad")
    Xs = syn.X.toarray() if sp.issparse(syn.X) else np.asarray(syn.X)
    mine = Xs[(syn.obs["site"].astype(str) == site).to_numpy()] if "site" in syn.obs else Xs
    out = {"synthetic": (-_min_dist(members, Xs), -_min_dist(others, Xs))}
    z_syn = vae.encode(torch.as_tensor(mine, dtype=torch.float32))[0].numpy()
    z = lambda X: vae.encode(torch.as_tensor(X, dtype=torch.float32))[0].numpy()  # noqa: E731
    out["latent"] = (-_min_dist(z(members), z_syn), -_min_dist(z(others), z_syn))

    def recon(X: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(X, dtype=torch.float32)
        return ((vae.decode(vae.encode(x)[0]) - x) ** 2).sum(1).numpy()

    out["reconstruction"] = (-recon(members), -recon(others))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # first paragraph: argparse rewraps it
    ap.add_argument("data", type=Path)
    ap.add_argument("--site", required=True, help="value of the site column whose data gets the canaries")
    ap.add_argument("--site-key", default="batch")
    ap.add_argument("--canaries", type=int, default=40, help="planted canaries (as many more are held out)")
    ap.add_argument("--out", type=Path, required=True, help="run directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override (repeatable)")
    args = ap.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    rng = np.random.default_rng(args.seed)
    adata = read_h5ad(args.data)
    at_site = np.flatnonzero(adata.obs[args.site_key].astype(str).to_numpy() == args.site)
    rows = rng.choice(at_site, 2 * args.canaries, replace=False)
    canaries = make_canaries(adata, rows, rng)
    planted, held = canaries[: args.canaries].copy(), canaries[args.canaries :].copy()
    planted_file = args.out.parent / f"{args.out.name}-data.h5ad"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ad.concat([adata, planted], merge="same").write_h5ad(planted_file)
    overrides = {"sim-site-key": args.site_key, "seed": args.seed, **parse_overrides(args.set)}
    run_dir = simulate_file(planted_file, out=args.out, overrides=overrides)
    plan = json.loads((run_dir / "plan.json").read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    label_key, spec = plan["spec"]["label-key"], plan["spec"]
    full = read_h5ad(planted_file)
    site_data = full[full.obs[args.site_key].astype(str).to_numpy() == args.site].copy()
    prepared = prepare_site(
        site_data,
        label_key=label_key,
        expect=spec["expect"],
        vocabulary=plan["genes"],
        min_coverage=spec["min-coverage"],
        min_cells_per_class=spec["min-cells-per-class"],
        test_fraction=spec["test-fraction"],
        val_fraction=spec["val-fraction"],
        seed=spec["split-seed"],
    )
    names = (
        site_data.obs_names.to_numpy()[prepared.rows] if prepared.rows is not None else site_data.obs_names.to_numpy()
    )
    train_names = set(names[prepared.train_idx])
    members_idx = [i for i, n in enumerate(names) if n.startswith("canary-") and n in train_names]
    members = prepared.X[members_idx].toarray()
    held_prepared = prepare_site(
        held,
        label_key=label_key,
        expect=spec["expect"],
        vocabulary=plan["genes"],
        min_coverage=0.0,
        min_cells_per_class=1,
        test_fraction=0.0,
        val_fraction=0.0,
        seed=0,
    )
    others = held_prepared.X.toarray()
    result = scores(run_dir, members, others, args.site)
    result |= {
        "members": len(members_idx),
        "held_out": int(others.shape[0]),
        "site": args.site,
        "dp_epsilon": cfg["run_config"].get("dp-epsilon", 0.0),
    }
    write_json(run_dir / "canary_audit.json", result)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("canary_mia", "canary_mia_null95"):
        metrics["rounds"][-1]["sites"][args.site]["audit"][key] = result[key]
    write_json(run_dir / "metrics.json", metrics)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
