"""report.html of a run directory: self-contained (base64 PNGs), written from synthetic.h5ad and metrics.json."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from shared.io import write_text

logger = logging.getLogger(__name__)

AUDIT_GUIDE = (
    "each site audits the fused synthetic cells on its own cells; 0.5 = no signal, 1.0 = a copied cell. "
    "Seed MIA: the cells whose latents seeded this site's codes vs held-out cells, by distance to the closest "
    "synthetic cell. Population MIA: every training cell vs held-out cells (blind to a few copies). "
    "Density MIA: a DOMIAS-style density-ratio attack on the seed cells. "
    "DCR share: synthetic cells closer to a training than to a held-out cell. Attacks bound the risk from below"
)


def _png(fig: Any) -> str:
    """A matplotlib figure as an <img> tag with a base64 PNG."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


PLOT_CELLS = 2000  # the picture shows at most this many cells (a seeded random subset): t-SNE of 2000 takes seconds


def _embedding(adata: Any) -> tuple[np.ndarray, str]:
    """t-SNE (scanpy's, on 30 principal components) of the cells, or PCA when t-SNE cannot run (too few cells).

    t-SNE, not UMAP: importing umap-learn compiles pynndescent's numba kernels the first time in an environment (24 s
    of a fresh clone's demo report) and its neighbour graph compiles more in every process (about 10 s); scanpy's
    t-SNE is scikit-learn's, 0.6 s for the demo's 200 cells.
    """
    import scanpy as sc

    from shared.device import torch_threads_kept

    a = adata.copy()
    n_comps = max(2, min(30, a.n_obs - 1, a.n_vars - 1))
    sc.pp.pca(a, n_comps=n_comps)
    try:
        with torch_threads_kept():  # an OpenMP pool would leave the ServerApp's next round on every core
            # scikit-learn's own learning-rate rule (n / 12, at least 50): scanpy's fixed 1000 throws a few of a small
            # set's cells far out and squeezes the rest into a corner of the picture
            sc.tl.tsne(
                a,
                use_rep="X_pca",
                perplexity=min(30.0, (a.n_obs - 1) / 3),
                learning_rate=max(a.n_obs / 12, 50.0),
                random_state=0,
            )
        return np.asarray(a.obsm["X_tsne"]), "t-SNE"
    except Exception as exc:  # noqa: BLE001 - a plot must never fail a finished run
        logger.warning("t-SNE failed (%s); plotting PCA instead", type(exc).__name__)
        return np.asarray(a.obsm["X_pca"][:, :2]), "PCA"


def _scatter(adata: Any, label_key: str) -> tuple[str, str]:
    import matplotlib.pyplot as plt

    if adata.n_obs > PLOT_CELLS:
        rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, PLOT_CELLS, replace=False))
        adata = adata[rows]
    xy, name = _embedding(adata)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, col in zip(axes, (label_key, "site"), strict=True):
        values = adata.obs[col].astype(str).to_numpy()
        for v in sorted(set(values)):
            m = values == v
            ax.scatter(xy[m, 0], xy[m, 1], s=12, label=v)
        ax.set_title(f"{name} of the fused synthetic cells, coloured by {col}")
        ax.legend(fontsize=7, markerscale=1.5, loc="best")
        ax.set_xticks([])
        ax.set_yticks([])
    return _png(fig), name


def _curves(rounds: list[dict[str, Any]]) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    r = [x["round"] for x in rounds]
    for ev in ("mlp", "logreg", "knn"):
        axes[0].plot(r, [x["aggregate"]["cell_weighted"][ev]["accuracy"] for x in rounds], marker="o", label=ev)
    axes[0].set(title="accuracy on held-out real cells (cell-weighted over sites)", xlabel="round", ylabel="accuracy")
    sites = sorted({s for x in rounds for s in x["sites"]})
    for s in sites:
        axes[1].plot(
            r,
            [x["sites"].get(s, {}).get("scores", {}).get("mlp", {}).get("accuracy", math.nan) for x in rounds],
            marker="o",
            label=s,
        )
    axes[1].set(title="MLP accuracy per site", xlabel="round", ylabel="accuracy")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.set_xticks(r)
    return _png(fig)


def _local(m: dict[str, Any], ev: str = "mlp", block: str = "local_only") -> float:
    return float(m.get(block, {}).get(ev, {}).get("accuracy", math.nan))


def _gain_plot(last: dict[str, Any]) -> str:
    """Bars per site: the MLP trained on the site's own cells only, the federated MLP, and the federated MLP trained
    further on the site's own cells."""
    import matplotlib.pyplot as plt

    sites = sorted(last["sites"])
    loc = [_local(last["sites"][s]) for s in sites]
    fed = [last["sites"][s]["scores"]["mlp"]["accuracy"] for s in sites]
    tuned = [_local(last["sites"][s], block="fine_tuned") for s in sites]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(sites) + 2), 3.5))
    x = np.arange(len(sites))
    ax.bar(x - 0.27, loc, 0.27, label="local-only (own training cells)")
    ax.bar(x, fed, 0.27, label="federated (fused synthetic cells)")
    ax.bar(x + 0.27, np.nan_to_num(tuned, nan=0.0), 0.27, label="federated, fine-tuned on own cells")
    ax.set_xticks(x, sites, rotation=20)
    finite = [v for v in (*fed, *loc, *tuned) if math.isfinite(v)]
    ax.set(
        ylabel="MLP accuracy on the site's test cells",
        ylim=(max(0.0, min([*finite, 1.0]) - 0.1), 1.0),
        title="what each site gains by joining",
    )
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


FIDELITY_BARS = (
    ("marker_overlap", "marker-gene overlap"),
    ("var_corr", "per-gene variance corr."),
    ("mean_corr", "per-gene mean corr."),
    ("zero_fraction_real", "zero fraction, real"),
    ("zero_fraction_synthetic", "zero fraction, synthetic"),
)


def _fidelity_plot(last: dict[str, Any]) -> str:
    """Grouped bars per site: how much the synthetic cells look like the site's own test cells."""
    import matplotlib.pyplot as plt

    sites = sorted(last["sites"])
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(sites) + 3), 3.5))
    x, width = np.arange(len(sites)), 0.8 / len(FIDELITY_BARS)
    for i, (key, label) in enumerate(FIDELITY_BARS):
        vals = [last["sites"][s]["fidelity"][key] for s in sites]
        ax.bar(x - 0.4 + (i + 0.5) * width, np.nan_to_num(vals, nan=0.0), width, label=label)
    ax.set_xticks(x, sites, rotation=20)
    ax.set(ylim=(0, 1.05), ylabel="against the site's test cells", title="fidelity of the synthetic cells (last round)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _png(fig)


def _fmt(v: Any) -> str:
    return (
        f"{v:.3f}"
        if isinstance(v, float) and math.isfinite(v)
        else ("n/a" if isinstance(v, float) else html.escape(str(v)))
    )


def _attack(audit: dict[str, float], key: str) -> str:
    """An attack's AUC with its chance bound, bold when above it."""
    value, bound = audit[key], audit.get(f"{key}_null95", math.nan)
    text = f"{_fmt(value)} ({_fmt(bound)})"
    return f"<b>{text}</b>" if math.isfinite(value) and math.isfinite(bound) and value > bound else text


def _site_table(last: dict[str, Any], upload: dict[str, dict[str, int]]) -> str:
    cols = (
        "site",
        "test / validation cells",
        "MLP acc",
        "LR acc",
        "kNN acc",
        "MLP acc local-only",
        "gain from joining",
        "MLP acc fine-tuned at the site",
        "gain, fine-tuned",
        "MLP acc (validation)",
        "seed MIA (chance bound)",
        "population MIA (chance bound)",
        "density MIA (chance bound)",
        "DCR share",
        "marker overlap",
        "zero fraction real / synthetic",
        "uploaded bytes",
    )
    head = "<tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
    rows = []
    for site, m in sorted(last["sites"].items()):
        sc, a, f = m["scores"], m["audit"], m["fidelity"]
        cells = [
            html.escape(site),
            f"{m['n_test']} / {m['validation']['n_val']}",
            *(_fmt(sc[ev]["accuracy"]) for ev in ("mlp", "logreg", "knn")),
            _fmt(_local(m)),
            _fmt(sc["mlp"]["accuracy"] - _local(m)),
            _fmt(_local(m, block="fine_tuned")),
            _fmt(_local(m, block="fine_tuned") - _local(m)),
            _fmt(m["validation"]["scores"]["mlp"]["accuracy"]),
            *(_attack(a, k) for k in ("seed_mia", "population_mia", "density_mia")),
            _fmt(a["dcr_share"]),
            _fmt(f["marker_overlap"]),
            f"{_fmt(f['zero_fraction_real'])} / {_fmt(f['zero_fraction_synthetic'])}",
            str(sum(upload.get(site, {}).values())),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    worst = last["aggregate"]["audit"]
    foot = (
        f"<p>Worst site, seed MIA: {_fmt(worst['seed_mia_max'])}; "
        f"mean over sites: seed {_fmt(worst['seed_mia'])}, population {_fmt(worst['population_mia'])}, "
        f"density {_fmt(worst['density_mia'])}, DCR share {_fmt(worst['dcr_share'])}. In brackets, each AUC's chance "
        "bound at that site: the 95th percentile of the same AUC with members and held-out cells exchanged at random "
        "within each class; a score above it (bold) is evidence of leakage at the 5 % level.</p>"
    )
    return f"<table>{head}{''.join(rows)}</table>{foot}"


def _privacy_table(privacy: dict[str, dict[str, Any]]) -> str:
    """Per site: the epsilon and delta its accountant spent over the run, and every mechanism it released through."""
    rows = "".join(
        f"<tr><td>{html.escape(site)}</td><td>{rep['epsilon']:.3g}</td><td>{rep['delta']:.2g}</td>"
        f"<td><ul>{''.join(f'<li>{html.escape(str(m))}</li>' for m in rep['mechanisms'])}</ul></td></tr>"
        for site, rep in sorted(privacy.items())
    )
    return (
        "<p>Cell-level differential privacy: each site's accountant composed every release of the run (Renyi DP). "
        "Not covered: the evaluation scores and audit numbers a site returns (README, Privacy).</p>"
        f"<table><tr><th>site</th><th>epsilon</th><th>delta</th><th>mechanisms</th></tr>{rows}</table>"
    )


def render(metrics: dict[str, Any], synthetic: Any, *, label_key: str) -> str:
    """The report as one HTML string."""
    rounds = metrics.get("rounds", [])
    parts = [
        "<h1>fedscdd run report</h1>",
        f"<p>sites: {html.escape(', '.join(metrics.get('sites', [])))}; "
        f"{synthetic.n_obs} synthetic cells x {synthetic.n_vars} genes in the final fused set.</p>",
    ]
    if rounds:
        agg = rounds[-1]["aggregate"]
        parts.append(
            f"<p>Final round: MLP accuracy {_fmt(agg['cell_weighted']['mlp']['accuracy'])} (cell-weighted), "
            f"{_fmt(agg['macro']['mlp']['accuracy'])} (mean over sites).</p>"
        )
        parts += ["<h2>Accuracy per round and per site</h2>", _curves(rounds)]
        if any(math.isfinite(_local(m)) for m in rounds[-1]["sites"].values()):
            parts += [
                "<h2>What each site gains by joining</h2>",
                "<p>The same MLP trained on the site's own training cells only, "
                "scored on the same test cells, beside the federated one (last round).</p>",
                _gain_plot(rounds[-1]),
            ]
        fid = agg.get("fidelity", {})
        parts += [
            "<h2>Fidelity: do the synthetic cells look like real ones?</h2>",
            "<p>Each site compares the fused synthetic cells with its own test cells "
            "(top-50 wilcoxon marker genes per class, scanpy; per-gene mean and variance correlation; zero fraction). "
            f"Mean over sites: marker overlap {_fmt(fid.get('marker_overlap', math.nan))}, "
            f"zero fraction {_fmt(fid.get('zero_fraction_synthetic', math.nan))} synthetic vs "
            f"{_fmt(fid.get('zero_fraction_real', math.nan))} real.</p>",
            _fidelity_plot(rounds[-1]),
        ]
        parts += [
            "<h2>Per site, last round (scores, privacy audit, fidelity)</h2>",
            f"<p><b>Privacy audit:</b> {AUDIT_GUIDE}.</p>",
            _site_table(rounds[-1], metrics.get("upload_bytes", {})),
        ]
    if metrics.get("privacy"):
        parts += ["<h2>Differential privacy spent</h2>", _privacy_table(metrics["privacy"])]
    img, method = _scatter(synthetic, label_key)
    how = "scanpy sc.pp.pca, sc.tl.tsne" if method == "t-SNE" else "scanpy sc.pp.pca (t-SNE could not run)"
    shown = (
        f"a random {PLOT_CELLS} of its {synthetic.n_obs} cells"
        if synthetic.n_obs > PLOT_CELLS
        else f"its {synthetic.n_obs} cells"
    )
    parts += [
        "<h2>Fused synthetic cells</h2>",
        f"<p>{method} of the final fused synthetic set ({shown}; {how}), coloured by class and by site.</p>",
        img,
    ]
    if metrics.get("dropped"):
        items = "".join(
            f"<li>{html.escape(str(d['site']))} / {html.escape(str(d['phase']))}: {html.escape(str(d['reason']))}</li>"
            for d in metrics["dropped"]
        )
        parts += ["<h2>Dropped sites</h2>", f"<ul>{items}</ul>"]
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>fedscdd report</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )


def write_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.html from the run's synthetic.h5ad and metrics.json."""
    import anndata as ad

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    for need in ("metrics.json", "synthetic.h5ad", "plan.json"):
        if not (run_dir / need).is_file():
            from shared.errors import ConfigError

            msg = f"{run_dir} has no {need}; pass the directory of a completed run (out-dir/<run-id>)"
            raise ConfigError(msg)
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    plan = json.loads((run_dir / "plan.json").read_text(encoding="utf-8"))
    synthetic = ad.read_h5ad(run_dir / "synthetic.h5ad")
    out = write_text(run_dir / "report.html", render(metrics, synthetic, label_key=plan["spec"]["label-key"]))
    logger.info("report written in %.1f s: %s", time.perf_counter() - t0, out)
    return out
