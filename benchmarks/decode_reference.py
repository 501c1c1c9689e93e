"""Marker genes and accuracy of a run's synthetic cells against real ones, per decode mode (a tuning script: choices
are made on its VALIDATION columns; the all-cells column, which includes test cells, is the issue's figure, reported
only).

    python benchmarks/decode_reference.py RUN_DIR [RUN_DIR ...] [--modes expected,counts] [--samples 10] [--draws 1]
        [--weigh-draws] [--recenter MIN_CELLS] [--cache DIR]

RUN_DIR is a finished ``scdd simulate`` run with one distillation round (its plan.json, config.json, metrics.json,
pretrained/ and state/codes.npz); a DP run only without ``counts`` (its sites noised their library statistics, which
this script would rebuild without noise). Each site is loaded as the run loaded it (same file, split and seed). The
run's codes are decoded again by the shipped fusion (``server.synthesis.fuse_round``) with the generator they were
made with, once per decode mode, and compared with reference sets of real cells of the same sites:

- ``real, all training cells`` and ``real, 10 per class per site`` (random training cells: the issue's baseline);
- ``MODE`` for every decode mode asked for (``counts`` / ``sample`` / ``gaussian`` draw ``--samples`` cells per
  code).

Per set it prints the marker overlap (scanpy wilcoxon, top 50 per class; ``shared.evaluation.marker_overlap``)
twice: against the pooled validation cells of the sites (held out), and against every cell of the sites (training,
validation and test: the measurement the fidelity issue quotes, where 10 random real cells per class per site reach
0.84 on kang); then the zero fraction, and the MLP / logistic-regression accuracy on the pooled validation cells of
the run's evaluators (the run's MLP rule) trained on that set.

``--draws N`` averages every figure over N draws: the drawing modes decode their cells afresh each time (seeds
seed + 10, + 11, ...) and the evaluators of every set train with seeds seed, seed + 1, ...: one draw of sampled cells
moves the accuracy by about as much as the differences between modes do.

``--recenter MIN_CELLS`` adds, for ``expected`` and ``gaussian``, the same cells moved onto each site's training-cell
class means (classes of at least MIN_CELLS cells: what a site sends under the run config ``recenter``), once shifted
and once scaled (``server.synthesis.recenter``).

``--weigh-draws`` fits the logistic regression on the drawing modes' cells with weight 1 / ``--samples`` per cell
(``shared.evaluation.fit_logreg``'s sample_weight): its L2 penalty is fixed while its loss sums over rows, so ten
cells drawn from one code are otherwise fitted with a tenth of the regularisation of the code itself. The MLP is
unchanged (a uniform weight scales its loss, which Adam does not see). The sets are labelled ``..., weighted``.

The sites' own fidelity in metrics.json compares each site's cells alone (a few dozen validation cells per site on
kang), so its marker overlaps are lower for every set, real cells included.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import cast

import numpy as np
import scipy.sparse as sp
import torch

from client.site import SiteData, cache_dir, load_site, resolve_source
from server.run_store import RunStore
from server.synthesis import DRAWING_MODES, RecenterHow, SiteCodes, counts_available, fuse_round
from shared.checkpoint import load_model
from shared.counts import library_stats
from shared.distill import class_gene_means
from shared.evaluation import MLPTrainConfig, fit_logreg, marker_overlap, predict_mlp, train_mlp
from shared.models import SCDG, VAE
from shared.protocol import Plan

logger = logging.getLogger("decode_reference")
PER_CLASS = 10  # real cells per class per site in the baseline set (the fidelity issue's)
FILES = ("plan.json", "config.json", "metrics.json", "pretrained/vae.pt", "pretrained/scdg.pt", "state/codes.npz")


def _accuracy(
    X: np.ndarray,
    y: np.ndarray,
    val: tuple[np.ndarray, np.ndarray],
    n_classes: int,
    rule: MLPTrainConfig,
    seed: int,
    weight: float = 1.0,
) -> tuple[float, float]:
    """(MLP, logistic regression) accuracy on the validation cells, trained on (X, y) as the federation trains them
    (``weight``: every row's weight in the logistic regression)."""
    X_val, y_val = val
    mlp = train_mlp(X, y, n_classes, seed=seed, cfg=rule)
    lr = fit_logreg(X, y, seed=seed, sample_weight=None if weight == 1.0 else np.full(len(y), weight))
    return float((predict_mlp(mlp, X_val) == y_val).mean()), float((lr.predict(X_val) == y_val).mean())


def _site_rows(site: SiteData, plan: Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(plan class per cell, training rows, validation rows) over the cells whose class is in the plan."""
    y, ok = site.global_labels(plan.classes)
    return y, site.train_idx[ok[site.train_idx]], site.val_idx[ok[site.val_idx]]


Row = tuple[str, float, float, float, float, float]


def study(
    run: Path,
    modes: list[str],
    samples: int,
    cache: Path,
    draws: int = 1,
    weigh: bool = False,
    recenter_min: int = 0,
) -> list[Row]:
    """(set, marker overlap vs validation cells, vs all cells, zero fraction, MLP, LR) per set of one run, each the
    mean over ``draws`` draws of the drawing modes' cells and seeds of the evaluators (seed, seed + 1, ...);
    ``weigh``: the logistic regression weighs each drawn cell 1 / ``samples``."""
    plan = Plan.from_json(json.loads((run / "plan.json").read_text(encoding="utf-8")))
    run_config = json.loads((run / "config.json").read_text(encoding="utf-8"))["run_config"]
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    if len(metrics["rounds"]) != 1:
        raise SystemExit(f"{run}: {len(metrics['rounds'])} distillation rounds; this script reads one-round runs")
    dp = float(run_config.get("dp-epsilon", 0.0) or 0.0) > 0
    if dp and "counts" in modes:
        raise SystemExit(
            f"{run}: a DP run; this script would rebuild its library statistics without noise: drop 'counts' from "
            "--modes, or pass a run without dp-epsilon"
        )
    seed = int(run_config["seed"])
    rule = MLPTrainConfig(
        epochs=float(run_config["mlp-epochs"]),
        min_steps=int(run_config["mlp-min-steps"]),
        max_steps=int(run_config["mlp-max-steps"]),
    )
    vae = cast(VAE, load_model(run / "pretrained/vae.pt", "vae"))
    scdg = cast(SCDG, load_model(run / "pretrained/scdg.pt", "scdg"))
    checkpoint = RunStore(run).load_checkpoint()
    codes = checkpoint.codes if checkpoint is not None else {}
    n_classes = len(plan.classes)
    rng = np.random.default_rng(seed)
    parts: list[SiteCodes] = []
    means: dict[str, np.ndarray] = {}
    train_X, train_y, few_X, few_y, val_X, val_y, all_X, all_y = ([] for _ in range(8))
    for partition in range(len(metrics["rounds"][-1]["sites"])):
        site = load_site(resolve_source({"partition-id": partition}, run_config), plan.spec, plan.genes, cache=cache)
        y, train, val = _site_rows(site, plan)
        if site.name in codes:
            library = (
                library_stats(site.X[train], site.library[train], y[train], n_classes)
                if site.has_counts and not dp
                else None
            )
            own = run_config.get("site-covariate", "off") == "own"  # decode with the site's vector, as the run did
            vector = checkpoint.site_vectors.get(site.name) if own and checkpoint is not None else None
            parts.append(SiteCodes(site.name, codes[site.name], library=library, site_vector=vector))
        else:  # dropped from distillation: the run scored it without its codes, and so does this script
            logger.warning(
                "%s: site %s sent no codes (dropped from distillation); its cells are still scored", run, site.name
            )
        if recenter_min:
            # as a site sends them under recenter (client.tasks.distill_site), NaN rows as zero: left alone
            means[site.name] = np.nan_to_num(class_gene_means(site.X[train], y[train], n_classes, recenter_min))
        train_X.append(site.X[train])
        train_y.append(y[train])
        picks = [
            rng.choice(train[y[train] == c], min(PER_CLASS, int((y[train] == c).sum())), replace=False)
            for c in np.unique(y[train])
        ]
        few = np.concatenate(picks)
        few_X.append(site.X[few])
        few_y.append(y[few])
        val_X.append(site.X[val])
        val_y.append(y[val])
        known = np.flatnonzero(y >= 0)
        all_X.append(site.X[known])
        all_y.append(y[known])
    if not parts:
        raise SystemExit(f"{run}: no site's codes in state/codes.npz")
    dense = lambda blocks: np.asarray(sp.vstack(blocks).toarray(), dtype=np.float32)  # noqa: E731
    val_set = (dense(val_X), np.concatenate(val_y))
    every = (dense(all_X), np.concatenate(all_y))
    sets = {
        "real, all training cells": (dense(train_X), np.concatenate(train_y)),
        f"real, {PER_CLASS} per class per site": (dense(few_X), np.concatenate(few_y)),
    }
    drawn: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [xy] for name, xy in sets.items()}
    variants: list[tuple[str, dict[str, np.ndarray] | None, RecenterHow]] = [(m, None, "shift") for m in modes]
    if recenter_min:
        variants += [(m, means, how) for m in modes if m in ("expected", "gaussian") for how in ("shift", "scale")]
    for mode, class_means, how in variants:
        if mode == "counts" and not counts_available(parts, vae):
            logger.warning("%s: no count input at every site, so no counts to decode; mode 'counts' skipped", run)
            continue
        label = mode if mode == "expected" else f"{mode}, {samples} per code" + (", weighted" if weigh else "")
        label += f", recentred ({how})" if class_means is not None else ""
        drawn[label] = []
        for d in range(draws if mode in DRAWING_MODES else 1):  # a fresh draw of every cell each time
            fused = fuse_round(
                parts,
                vae,
                scdg,
                plan,
                round_=1,
                provenance={},
                mode=mode,  # type: ignore[arg-type]
                seed=seed + 10 + d,
                samples_per_code=samples,
                class_means=class_means,
                recenter_how=how,
            )
            drawn[label].append(
                (
                    np.asarray(fused.X.toarray(), dtype=np.float32),
                    np.asarray(fused.obs[plan.spec.label_key].cat.codes, dtype=np.int64),
                )
            )
    rows: list[Row] = []
    for name, versions in drawn.items():
        fidelity = np.mean(
            [
                [*(marker_overlap(r[0], r[1], X, y) for r in (val_set, every)), float((X == 0).mean())]
                for X, y in versions
            ],
            axis=0,
        )
        # the evaluators' seed moves with each draw; a set that draws nothing is trained on again with the next seed
        weight = 1.0 / samples if ", weighted" in name else 1.0  # the drawing modes under --weigh-draws
        mlp, lr = np.mean(
            [_accuracy(*versions[d % len(versions)], val_set, n_classes, rule, seed + d, weight) for d in range(draws)],
            axis=0,
        )
        rows.append((name, float(fidelity[0]), float(fidelity[1]), float(fidelity[2]), float(mlp), float(lr)))
    nan = float("nan")
    rows.append(
        (
            f"(real: {len(val_set[1])} validation / {len(every[1])} cells)",
            nan,
            nan,
            float((val_set[0] == 0).mean()),
            nan,
            nan,
        )
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--modes", default="expected,counts", help="decode modes, comma-separated (default: %(default)s)")
    ap.add_argument("--samples", type=int, default=10, help="cells per code in the drawing modes (default: 10)")
    ap.add_argument(
        "--draws",
        type=int,
        default=1,
        help="average every score over this many draws of the sampled cells and evaluator seeds (default: 1)",
    )
    ap.add_argument(
        "--weigh-draws",
        action="store_true",
        help="the logistic regression weighs each cell of a drawing mode 1 / --samples (default: weight 1)",
    )
    ap.add_argument(
        "--recenter",
        type=int,
        default=0,
        metavar="MIN_CELLS",
        help="also decode expected / gaussian moved onto each site's training class means (classes of at least "
        "MIN_CELLS cells), shifted and scaled (server.synthesis.recenter); default 0: not",
    )
    ap.add_argument("--cache", type=Path, help="the sites' cache folder (default: the SuperNodes' default)")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ("expected", *DRAWING_MODES)]
    if unknown or not modes:
        raise SystemExit(
            f"--modes: {', '.join(unknown) or 'none given'}; choose from {', '.join(('expected', *DRAWING_MODES))}"
        )
    if not 1 <= args.samples <= 20:
        raise SystemExit(f"--samples must be within 1..20 (as samples-per-code), got {args.samples}")
    if not 1 <= args.draws <= 20:
        raise SystemExit(f"--draws must be within 1..20, got {args.draws}")
    for run in args.runs:
        missing = [f for f in FILES if not (run / f).is_file()]
        if missing:
            raise SystemExit(
                f"{run}: not a finished run (no {', '.join(missing)}); pass an `scdd simulate --out` folder"
            )
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    cache = cache_dir({"cache-dir": str(args.cache)} if args.cache else {})
    print("| run | set | markers vs validation cells | markers vs all cells | zero fraction | MLP | LR |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        rows = study(run, modes, args.samples, cache, args.draws, args.weigh_draws, args.recenter)
        for name, ov_val, ov_all, zeros, mlp, lr in rows:
            print(
                f"| {run.name} | {name} | {ov_val:.3f} | {ov_all:.3f} | {zeros:.3f} | {mlp:.3f} | {lr:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
