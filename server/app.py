"""The fedscdd ServerApp: read the typed config, run the orchestrator."""

from __future__ import annotations

import logging
import random
import sys

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server import orchestration
from server.config import FederationConfig

logger = logging.getLogger(__name__)

app = ServerApp()


def _progress_to_run_log() -> None:
    """Show the coordinator's INFO lines in Flower's run log (flwr run --stream, flwr log).

    Flower mirrors the ServerApp process's stderr into the run log but configures only its own
    "flwr" logger, so ours would stay silent. A host that already shows INFO lines (scdd simulate,
    a notebook with logging configured) keeps its own setup.
    """
    root = logging.getLogger()
    if root.hasHandlers() and root.getEffectiveLevel() <= logging.INFO:
        return
    log = logging.getLogger("server")
    if any(getattr(h, "fedscdd_run_log", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.fedscdd_run_log = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # a root handler at WARNING would print the warnings twice


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config (an empty run config works)."""
    _progress_to_run_log()
    cfg = FederationConfig.from_run_config(context.run_config)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    run_dir = orchestration.run(grid, cfg, run_id=f"run-{context.run_id}")
    logger.info("outputs in %s", run_dir)
