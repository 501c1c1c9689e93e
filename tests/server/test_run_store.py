"""Run directory: outputs, checkpoint round trip, fresh-start clearing, and the self-contained report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from server.report import write_report
from server.run_store import RunStore, package_versions
from server.synthesis import fresh_models
from shared.checkpoint import state_of
from shared.distill import Codes
from shared.errors import ConfigError
from shared.protocol import Plan, SiteSpec

PLAN = Plan(tuple(f"g{i}" for i in range(12)), ("B", "T"), SiteSpec(label_key="cell_type"))


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    assert store.load_checkpoint() is None
    vae, scdg = fresh_models(PLAN, latent_dim=4, seed=0)
    store.checkpoint(["pretrain"], plan=PLAN, metrics={"rounds": []}, config={"seed": 0}, vae=vae, scdg=scdg)
    back = store.load_checkpoint()
    assert back is not None and back.completed == ("pretrain",) and back.plan == PLAN and back.config == {"seed": 0}
    for k, v in state_of(scdg).items():
        assert np.array_equal(state_of(back.scdg)[k], v)
    assert back.codes == {} and back.site_vectors == {}
    codes = {
        "site_b": Codes(np.ones((2, 4), np.float32), np.array([0, 1]), 600, 2.0),
        "site_a": Codes(np.zeros((1, 4), np.float32), np.array([1]), 400, 1.5),
    }
    vectors = {"site_b": np.arange(3, dtype=np.float32), "site_a": -np.ones(3, np.float32)}
    store.checkpoint(
        ["pretrain", "round-1"],
        plan=PLAN,
        metrics={"rounds": []},
        config={"seed": 0},
        vae=vae,
        scdg=scdg,
        codes=codes,
        site_vectors=vectors,
    )
    again = store.load_checkpoint()
    assert again is not None and sorted(again.codes) == ["site_a", "site_b"]
    assert sorted(again.site_vectors) == ["site_a", "site_b"]
    assert all(np.array_equal(again.site_vectors[s], v) for s, v in vectors.items())
    for site, c in codes.items():
        got = again.codes[site]
        assert (
            np.array_equal(got.codes, c.codes)
            and np.array_equal(got.labels, c.labels)
            and (got.t_star, got.guidance) == (c.t_star, c.guidance)
        )


def test_fresh_start_removes_previous_outputs_only(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for name in ("metrics.json", "synthetic_round3.h5ad", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.json").write_text("{}")
    store.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_config_json_records_versions(tmp_path: Path) -> None:
    RunStore(tmp_path).write_config({"seed": 3}, run_id="r")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["run_config"] == {"seed": 3} and cfg["run_id"] == "r"
    assert set(package_versions()) >= {"flwr", "torch", "anndata", "scanpy", "numpy", "python"}


def test_report_needs_a_completed_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.json"):
        write_report(tmp_path)
