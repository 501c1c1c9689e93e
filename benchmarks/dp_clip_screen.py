"""Offline screen of the DP class-means release: how the budget split and the clipping bound change what a classifier
learns from the released means. A tuning script: it scores its own held-out cells, never a run's test cells.

    python benchmarks/dp_clip_screen.py DATA.h5ad PLAN.json [--sites batch|dirichlet] [--clips 30 40] [--epsilon 8]
        [--joint]

PLAN.json is a finished DP run's plan (its genes). Sites are the file's ``batch`` column, or 3 Dirichlet(0.5) label-
skewed sites. 70 % of each site's cells are training cells, 15 % held out (seeded). For each variant and 3 noise draws:
each site releases noised counts and class sums as ``client.privacy`` does, the means are denoised
(``shared.privacy.denoise.soft_threshold_means``), cells are drawn around them as ``server.dp_pretrain.draw_cells``
draws them, and a logistic regression trained on the drawn cells is scored on the held-out cells. Variants: the even
split of epsilon with cells clipped to 60 (the previous default); the class means at half the other releases' noise,
clipped to 60; the same, each cell's difference to the center (the pooled mean of the sites' noised profiles) clipped to
each of ``--clips``; with ``--support-scales``, other ratios of the other releases' noise to the class means' (centered,
first clip); with ``--site-delta``, the class means' noise each site's accountant gives them (``spend_rest``: the run
spends the target at the site's delta from its noised count; centered, first clip). The noise draws are shared across
variants. With ``--joint`` it screens the coordinator's denoising instead (site's delta, centered, first clip): each
site's release alone (the ``dp-denoise = "site"`` default), every site's together (``"joint"``,
``shared.privacy.denoise.joint_denoise``), the same with the shared directions shrunk, and each class pooled over
the sites that have it (``"class"``, ``shared.privacy.denoise.class_denoise``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression

from server.dp_pretrain import MIN_CELLS, draw_cells
from shared.data import normalize
from shared.privacy import mechanisms as mech
from shared.privacy.accounting import PRIMARY, SUPPORT_SCALE, release_noise, site_calibration, stats_noise
from shared.privacy.denoise import class_denoise, joint_denoise, soft_threshold_means
from shared.privacy.spec import DPSpec

DRAWS = 3


def _sites(a: ad.AnnData, y: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    if how == "batch":
        return np.unique(a.obs["batch"].astype(str).to_numpy(), return_inverse=True)[1]
    s = np.zeros(len(y), np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        s[idx] = rng.choice(3, len(idx), p=rng.dirichlet([0.5] * 3))
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("plan")
    ap.add_argument("--sites", choices=("batch", "dirichlet"), default="batch")
    ap.add_argument("--clips", type=float, nargs="+", default=[30.0, 40.0])
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument(
        "--support-scales",
        type=float,
        nargs="*",
        default=[],
        help="also screen these other-release / class-means noise ratios (centered, first clip); the default is "
        f"SUPPORT_SCALE = {SUPPORT_SCALE:g}",
    )
    ap.add_argument(
        "--site-delta", action="store_true", help="also screen the class means at the noise each site's delta allows"
    )
    ap.add_argument(
        "--joint",
        action="store_true",
        help="screen the coordinator's denoising instead: each site's release alone, all sites together "
        "(shared.privacy.denoise.joint_denoise), and the same with the shared directions shrunk (site's delta, "
        "centered, first clip)",
    )
    ap.add_argument("--label-key", default="cell_type")
    args = ap.parse_args()

    plan = Path(args.plan)
    if not plan.is_file():
        raise SystemExit(f"{plan}: no such plan; pass the plan.json of a finished DP run (scdd simulate --out DIR)")
    genes = json.loads(plan.read_text(encoding="utf-8"))["genes"]
    a = ad.read_h5ad(args.data)
    missing = [g for g in genes if g not in a.var_names]
    if missing:
        raise SystemExit(
            f"{len(missing)} of the plan's {len(genes)} genes are not in {args.data} (e.g. {missing[0]}): "
            "pass the plan of a run on this file"
        )
    head = a.X[:50].toarray() if sp.issparse(a.X) else np.asarray(a.X[:50])
    X_all = normalize(a.X, "counts" if head.max() > 20 else "lognorm")
    cols = [a.var_names.get_loc(g) for g in genes]
    X = X_all[:, cols].toarray().astype(np.float64)
    classes, y = np.unique(a.obs[args.label_key].astype(str).to_numpy(), return_inverse=True)
    rng0 = np.random.default_rng(0)
    site = _sites(a, y, args.sites, rng0)
    u = rng0.random(len(y))
    train, held = u < 0.7, (u >= 0.7) & (u < 0.85)

    sched = DPSpec(args.epsilon, None, 1.0, "screen", class_means=True).schedule(2000.0, has_counts=True)
    even = stats_noise(args.epsilon, len(sched.one_shot), 1.0)
    split_main = release_noise(args.epsilon, sched, PRIMARY)
    split_other = release_noise(args.epsilon, sched, "label counts")

    def at_site_delta(n: float) -> float:  # the class means' noise of a site with n noised training cells
        spec = DPSpec(args.epsilon, None, 1.0, "screen", class_means=True)
        delta = spec.site_delta(n)
        site_sched, noise = site_calibration(args.epsilon, delta, spec.schedule(n, has_counts=True))
        return noise.stats * site_sched.scale(PRIMARY)

    def score(
        sig_means: float | None, sig_other: float, clip: float, centered: bool, draw: int, denoise: str = "site"
    ) -> float:
        """sig_means None: each site's own (``at_site_delta``). denoise: "site" (each site's release alone), "joint"
        (every site's together, ``joint_denoise``), "shrunk" (joint, the shared directions shrunk) or "class" (each
        class pooled over the sites, ``class_denoise``)."""
        rng = np.random.default_rng(100 + draw)
        center = np.zeros(len(genes))
        if centered:  # the pooled mean of every site's noised profile sums (their full-gene clipped release)
            total, n = np.zeros(len(genes)), 0
            for k in np.unique(site):
                m = train & (site == k)
                part = mech.clipped_profile_sums(X_all[m])[0][cols]
                total += (part + rng.normal(0.0, sig_other, len(genes))) * mech.GENE_NORM * math.sqrt(3.0)
                n += int(m.sum())
            center = np.maximum(total / n, 0.0)
        means, counts, raw, sds = [], [], [], []
        for k in np.unique(site):
            m = train & (site == k)
            cnt = np.bincount(y[m], minlength=len(classes)) + rng.normal(0.0, sig_other, len(classes))
            cnt = np.where(cnt >= MIN_CELLS, np.rint(cnt), 0).astype(np.int64)
            sig = at_site_delta(float(max(cnt.sum(), 1))) if sig_means is None else sig_means
            sums = mech.noisy_class_sums((X[m] - center) / clip, y[m], len(classes), sig, rng) * clip
            means.append(soft_threshold_means(sums + cnt[:, None] * center, cnt, sig * clip))
            raw.append((sums + cnt[:, None] * center) / np.maximum(cnt, 1)[:, None] * (cnt > 0)[:, None])
            counts.append(cnt)
            sds.append(sig * clip)
        if denoise == "class":
            means = class_denoise(raw, counts, sds)
        elif denoise != "site":
            means = joint_denoise(raw, counts, sds, shrink=denoise == "shrunk")[0]
        Xd, yd = draw_cells(means, counts, seed=draw)
        return float(LogisticRegression(max_iter=300).fit(Xd.toarray(), yd).score(X[held], y[held]))

    variants: list[tuple[str, float | None, float, float, bool, str]] = []
    if args.joint:  # the shipped calibration (site's delta, centered, first clip), denoised three ways
        variants += [
            (f"site's delta, clip {args.clips[0]:g}, {what}", None, split_other, args.clips[0], True, how)
            for what, how in (
                ("each site alone", "site"),
                ("all sites together (dp-denoise = joint)", "joint"),
                ("all sites together, shared directions shrunk", "shrunk"),
                ("each class pooled over sites (dp-denoise = class)", "class"),
            )
        ]
    variants += [("even split, clip 60", even, even, 60.0, False, "site")]
    variants += [("split, clip 60", split_main, split_other, 60.0, False, "site")]
    variants += [(f"split, centered, clip {c:g}", split_main, split_other, c, True, "site") for c in args.clips]
    for ratio in args.support_scales:  # the class means at 1 / ratio of the other releases' noise
        scales = tuple(1.0 if name == PRIMARY else ratio for name in sched.one_shot)
        base = stats_noise(args.epsilon, len(sched.one_shot), 1.0, scales)
        variants.append(
            (f"ratio {ratio:g}, centered, clip {args.clips[0]:g}", base, base * ratio, args.clips[0], True, "site")
        )
    if args.site_delta:
        variants.append(
            (f"split, centered, clip {args.clips[0]:g}, site's delta", None, split_other, args.clips[0], True, "site")
        )
    print(f"{args.data}: {len(genes)} genes, {len(np.unique(site))} sites, epsilon {args.epsilon:g}")
    print("| variant | held-out LR accuracy (mean of 3 noise draws) | draws |")
    print("|---|---|---|")
    if args.joint:
        variants = variants[:4]  # the denoising screen alone
    for name, s_means, s_other, clip, centered, how in variants:
        accs = [score(s_means, s_other, clip, centered, d, how) for d in range(DRAWS)]
        print(f"| {name} | {np.mean(accs):.3f} | {' / '.join(f'{v:.3f}' for v in accs)} |", flush=True)


if __name__ == "__main__":
    main()
