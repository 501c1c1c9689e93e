"""The run directory ``out-dir/<run-id>/``: every output written atomically, plus a resumable server checkpoint.

Layout: run.log, config.json, plan.json, metrics.json, synthetic_round<r>.h5ad, synthetic.h5ad, vae.pt,
scdg.pt, mlp.pt, report.html; ``pretrained/`` (plan.json, vae.pt, scdg.pt as pretraining left them:
what ``pretrained-path`` reads, to distill again without FedAvg); ``state/`` holds the checkpoint after the last
completed phase (state.json, the generator pair, each site's latest codes in codes.npz and, under ``site-covariate``,
each site's VAE site vector in site_vectors.npz), from which ``resume=true`` continues.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import anndata as ad
import numpy as np

from shared.checkpoint import load_model, save_model
from shared.distill import Codes
from shared.io import write_h5ad, write_json, write_with
from shared.models import SCDG, VAE
from shared.protocol import SCHEMA_VERSION, Plan

logger = logging.getLogger(__name__)

PACKAGES = ("flwr", "torch", "anndata", "scanpy", "numpy", "scikit-learn", "fedscdd")
# Keys that may change between an interrupted run and its resumption (they do not change what was computed).
RESUME_FREE = frozenset(
    {
        "resume",
        "round-timeout-s",
        "site-wait-s",
        "out-dir",
        "report",
        "torch-threads",
        "num-distill-rounds",
        "expected-sites",
    }
)
RUN_LOG = "run.log"  # the coordinator's progress lines of this run (appended to on resume)
OUTPUTS = ("config.json", "plan.json", "metrics.json", "synthetic.h5ad", "vae.pt", "scdg.pt", "mlp.pt", "report.html")


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a run's numbers."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """Server state after the last completed phase."""

    completed: tuple[str, ...]
    plan: Plan
    metrics: dict[str, Any]
    config: dict[str, Any]
    vae: VAE
    scdg: SCDG
    codes: Mapping[str, Codes]  # each site's latest codes (the next round's warm start)
    site_vectors: Mapping[str, np.ndarray]  # site-covariate: each site's VAE site vector (empty without)


@contextmanager
def run_log(path: Path, *, fresh: bool) -> Iterator[None]:
    """Copy the coordinator's log lines ("server" loggers, at their configured level) into ``path`` while the block
    runs.

    A deployed ServerApp's own output reaches only Flower's run log (``flwr log``), not the SuperLink's
    log file or journal: this file is what an operator finds beside the run's outputs. ``fresh``
    starts it empty; otherwise (a resumed run) lines are appended.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if fresh:
        path.unlink(missing_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    log = logging.getLogger("server")
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir)
        self.state_dir = self.dir / "state"

    def clear(self) -> None:
        """Remove a previous run's outputs and checkpoint from this directory (a fresh start)."""
        if not self.dir.exists():
            return
        stale = [self.dir / n for n in OUTPUTS] + list(self.dir.glob("synthetic_round*.h5ad"))
        for path in stale:
            path.unlink(missing_ok=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        shutil.rmtree(self.dir / "pretrained", ignore_errors=True)
        logger.info("starting afresh in %s (previous outputs removed)", self.dir)

    def write_config(self, run_config: Mapping[str, Any], *, run_id: str) -> None:
        """config.json: the resolved config, run id, the run directory, schema and package versions."""
        write_json(
            self.dir / "config.json",
            {
                "run_id": run_id,
                "run_dir": str(self.dir),
                "run_config": dict(run_config),
                "schema_version": SCHEMA_VERSION,
                "versions": package_versions(),
            },
        )

    def write_plan(self, plan: Plan) -> None:
        """plan.json."""
        write_json(self.dir / "plan.json", plan.to_json())

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        """metrics.json."""
        write_json(self.dir / "metrics.json", dict(metrics))

    def write_synthetic(self, adata: ad.AnnData, *, round_: int, final: bool) -> None:
        """synthetic_round<r>.h5ad, and synthetic.h5ad when ``final``."""
        write_h5ad(self.dir / f"synthetic_round{round_}.h5ad", adata)
        if final:
            write_h5ad(self.dir / "synthetic.h5ad", adata)

    def save_pretrained(self, plan: Plan, vae: VAE, scdg: SCDG) -> Path:
        """pretrained/: the plan and the models as pretraining left them (a ``pretrained-path`` directory)."""
        base = self.dir / "pretrained"
        save_model(vae, base / "vae.pt")
        save_model(scdg, base / "scdg.pt")
        write_json(base / "plan.json", plan.to_json())  # last: a directory with plan.json is complete
        return base

    def save_models(self, **models: Any) -> None:
        """<name>.pt for each model (config travels with the weights)."""
        for name, model in models.items():
            save_model(model, self.dir / f"{name}.pt")

    def checkpoint(
        self,
        completed: Sequence[str],
        *,
        plan: Plan,
        metrics: Mapping[str, Any],
        config: Mapping[str, Any],
        vae: VAE,
        scdg: SCDG,
        codes: Mapping[str, Codes] | None = None,
        site_vectors: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write the state after a completed phase (models and codes first, state.json last: it marks the checkpoint
        valid)."""
        save_model(vae, self.state_dir / "vae.pt")
        save_model(scdg, self.state_dir / "scdg.pt")
        write_with(self.state_dir / "codes.npz", lambda tmp: _save_codes(tmp, codes or {}))
        write_with(self.state_dir / "site_vectors.npz", lambda tmp: _save_vectors(tmp, site_vectors or {}))
        write_json(
            self.state_dir / "state.json",
            {
                "completed": list(completed),
                "plan": plan.to_json(),
                "metrics": dict(metrics),
                "config": dict(config),
                "schema_version": SCHEMA_VERSION,
            },
        )
        logger.info("checkpoint written after %s", completed[-1] if completed else "start")

    def load_checkpoint(self) -> Checkpoint | None:
        """The last checkpoint, or None when there is none."""
        import json

        path = self.state_dir / "state.json"
        if not path.is_file():
            return None
        state = json.loads(path.read_text(encoding="utf-8"))
        # load_model checks each checkpoint's kind
        vae = cast(VAE, load_model(self.state_dir / "vae.pt", "vae"))
        scdg = cast(SCDG, load_model(self.state_dir / "scdg.pt", "scdg"))
        codes = _load_codes(self.state_dir / "codes.npz")
        vectors = _load_vectors(self.state_dir / "site_vectors.npz")
        return Checkpoint(
            tuple(state["completed"]),
            Plan.from_json(state["plan"]),
            state["metrics"],
            state["config"],
            vae,
            scdg,
            codes,
            vectors,
        )


def _save_codes(path: Path, codes: Mapping[str, Codes]) -> None:
    """One npz: per site (in sorted order) its codes, labels, t* and guidance; site names in 'sites'."""
    sites = sorted(codes)
    arrays: dict[str, np.ndarray] = {"sites": np.array(sites, dtype=np.str_)}
    for i, site in enumerate(sites):
        c = codes[site]
        arrays |= {
            f"codes{i}": c.codes,
            f"labels{i}": c.labels,
            f"meta{i}": np.array([c.t_star, c.guidance], dtype=np.float64),
        }
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub matches **arrays against allow_pickle: bool


def _save_vectors(path: Path, vectors: Mapping[str, np.ndarray]) -> None:
    """One npz: per site (in sorted order) its site vector; site names in 'sites'."""
    sites = sorted(vectors)
    arrays = {"sites": np.array(sites, dtype=np.str_)} | {f"v{i}": np.asarray(vectors[s]) for i, s in enumerate(sites)}
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _load_vectors(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():  # a checkpoint written before site vectors existed: a run without them
        return {}
    with np.load(path, allow_pickle=False) as npz:
        return {str(site): np.array(npz[f"v{i}"]) for i, site in enumerate(npz["sites"])}


def _load_codes(path: Path) -> dict[str, Codes]:
    if not path.is_file():  # a checkpoint written before codes were kept: the next round starts from fresh codes
        return {}
    with np.load(path, allow_pickle=False) as npz:
        return {
            str(site): Codes(
                npz[f"codes{i}"], npz[f"labels{i}"].astype(np.int64), int(npz[f"meta{i}"][0]), float(npz[f"meta{i}"][1])
            )
            for i, site in enumerate(npz["sites"])
        }
