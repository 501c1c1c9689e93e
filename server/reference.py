"""A public reference as a starting point: ``scdd pretrain`` writes one, ``init-path`` starts FedAvg from it.

``pretrain_reference`` trains the VAE + SCDG on every cell of a public (non-member) dataset and
writes ``plan.json``, ``vae.pt``, ``scdg.pt`` (what ``pretrained-path`` reads) and
``reference.json`` (provenance). ``init_models`` builds a run's fresh models for its plan and
copies every weight that transfers: the encoder's input columns and the decoder's output rows of
the plan's genes (the plan's genes are chosen within the reference's genes), every layer whose
shape matches, and the SCDG's null-class embedding. Class-specific rows (the VAE's label head, the
SCDG's class embeddings and QA head) start fresh: the reference's labels need not match the sites'.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch

from shared.checkpoint import load_model, save_model
from shared.data import Expect, gene_stats, prepare_site, read_h5ad, select_variable_genes
from shared.errors import ConfigError
from shared.io import write_json
from shared.models import SCDG, VAE
from shared.pretrain import PretrainConfig, new_models, pretrain
from shared.protocol import Plan, SiteSpec

logger = logging.getLogger(__name__)

FILES = ("plan.json", "vae.pt", "scdg.pt")
# VAE parameters indexed by gene, and the gene axis of each
GENE_AXES = {
    "encoder.0.weight": 1,
    "to_mean.weight": 0,
    "to_mean.bias": 0,
    "to_logit.weight": 0,
    "to_logit.bias": 0,
    "count_head.to_rho.weight": 0,
    "count_head.to_rho.bias": 0,
    "count_head.log_theta": 0,
}


def pretrain_reference(
    path: str | Path,
    out: str | Path,
    *,
    label_key: str,
    n_genes: int = 2000,
    cfg: PretrainConfig | None = None,
    expect: str = "auto",
) -> Path:
    """Train VAE + SCDG on all cells of a reference .h5ad; write plan.json, vae.pt, scdg.pt, reference.json to
    ``out``."""
    cfg = cfg or PretrainConfig()
    out = Path(out).expanduser()
    adata = read_h5ad(path)
    site = prepare_site(
        adata,
        label_key=label_key,
        expect=cast(Expect, expect),  # prepare_site refuses any other value
        test_fraction=0.0,
        val_fraction=0.0,
        min_cells_per_class=1,
    )
    sums, sumsq, detected = gene_stats(site.X)
    genes = select_variable_genes(site.genes, sums, sumsq, detected, site.X.shape[0], n_top=n_genes)
    pos = {g: i for i, g in enumerate(site.genes)}
    X = site.X[:, [pos[g] for g in genes]].tocsr()
    t0 = time.perf_counter()
    pre = pretrain(X, site.labels, len(site.classes), cfg)
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan(tuple(genes), site.classes, SiteSpec(label_key=label_key, expect=expect))
    save_model(pre.vae, out / "vae.pt")
    save_model(pre.scdg, out / "scdg.pt")
    write_json(
        out / "reference.json",
        {
            "source": Path(path).name,
            "n_cells": int(X.shape[0]),
            "n_genes": len(genes),
            "classes": list(site.classes),
            "vae_steps": cfg.vae.steps,
            "scdg_steps": cfg.scdg.steps,
            "seed": cfg.seed,
            "seconds": round(seconds, 1),
        },
    )
    write_json(out / "plan.json", plan.to_json())  # last: a directory with plan.json is complete
    logger.info(
        "reference pretrained on %d cells x %d genes, %d classes in %.0f s: %s",
        X.shape[0],
        len(genes),
        len(site.classes),
        seconds,
        out,
    )
    return out


def load_reference(path: str | Path) -> tuple[Plan, VAE, SCDG]:
    """The plan and models of a ``scdd pretrain`` (or run) directory, with a clear error when something is missing."""
    base = Path(path).expanduser()
    missing = [f for f in FILES if not (base / f).is_file()]
    if missing:
        msg = (
            f"{base} is not a pretrained directory: {', '.join(missing)} missing; "
            "create one with `scdd pretrain REFERENCE.h5ad --label-key KEY --out DIR`"
        )
        raise ConfigError(msg)
    plan = Plan.from_json(json.loads((base / "plan.json").read_text(encoding="utf-8")))
    return plan, load_model(base / "vae.pt", "vae"), load_model(base / "scdg.pt", "scdg")  # type: ignore[return-value]


def _copy(dst: dict[str, torch.Tensor], key: str, value: torch.Tensor, copied: list[str]) -> None:
    if value.shape != dst[key].shape:
        msg = (
            f"reference weight {key} has shape {tuple(value.shape)}, the run's model {tuple(dst[key].shape)}; "
            "pretrain the reference with this fedscdd version"
        )
        raise ConfigError(msg)
    dst[key] = value.clone()
    copied.append(key)


def transfer(
    src: torch.nn.Module, dst: torch.nn.Module, *, src_genes: Sequence[str] = (), dst_genes: Sequence[str] = ()
) -> list[str]:
    """Copy into ``dst`` (in place) every weight of ``src`` that transfers; return the keys copied.

    Gene-indexed VAE weights are re-indexed from ``src_genes`` to ``dst_genes`` (every plan gene must
    be a reference gene); class rows are left as they are, except the SCDG's null-class row.
    """
    s, d = src.state_dict(), dst.state_dict()
    class_rows = set(getattr(dst, "class_rows", ()))
    copied: list[str] = []
    pos = {g: i for i, g in enumerate(src_genes)}
    absent = [g for g in dst_genes if g not in pos]
    if absent:
        msg = (
            f"{len(absent)} plan genes are not in the reference (e.g. {absent[:3]}); "
            "the plan must be chosen within the reference's genes"
        )
        raise ConfigError(msg)
    idx = torch.as_tensor([pos[g] for g in dst_genes], dtype=torch.long)
    for key, value in s.items():
        if key not in d:
            continue
        if isinstance(dst, VAE) and key in GENE_AXES:
            _copy(d, key, value.index_select(GENE_AXES[key], idx), copied)
        elif key == "class_emb.weight":  # the last row is the null class: shared by every label vocabulary
            d[key][-1] = value[-1]
            copied.append(key + "[null]")
        elif key not in class_rows:
            _copy(d, key, value, copied)
    dst.load_state_dict(d)
    return copied


def init_models(
    path: str | Path, genes: Sequence[str], n_classes: int, *, seed: int, count_head: bool = False
) -> tuple[VAE, SCDG, dict[str, Any]]:
    """Fresh VAE + SCDG for the plan (the reference's latent size), with every transferable weight from ``path``."""
    ref_plan, ref_vae, ref_scdg = load_reference(path)
    torch.manual_seed(seed)
    vae, scdg = new_models(len(genes), n_classes, ref_vae.config.latent_dim, count_head=count_head)
    n_vae = transfer(ref_vae, vae, src_genes=ref_plan.genes, dst_genes=genes)
    n_scdg = transfer(ref_scdg, scdg)
    vae.eval()
    scdg.eval()
    info = {
        "path": str(Path(path).expanduser()),
        "reference_genes": len(ref_plan.genes),
        "plan_genes": len(genes),
        "latent_dim": vae.config.latent_dim,
        "vae_tensors": len(n_vae),
        "scdg_tensors": len(n_scdg),
        "reference_classes": len(ref_plan.classes),
    }
    logger.info(
        "FedAvg starts from the reference %s: %d VAE and %d SCDG tensors transferred, class rows fresh",
        path,
        len(n_vae),
        len(n_scdg),
    )
    return vae, scdg, info


def reference_genes(path: str | Path) -> frozenset[str]:
    """The genes a plan may use with ``init-path``."""
    return frozenset(load_reference(path)[0].genes)


__all__ = ["init_models", "load_reference", "pretrain_reference", "reference_genes", "transfer"]
