"""The pretraining options `site-optimizer-state`, `local-lr-decay` and `balanced-class-heads` through the real
ServerApp and ClientApp."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from server.cli.simulation import run_in_process
from server.fedavg import LR_FLOOR, local_lr
from shared.checkpoint import load_model, model_hash
from shared.pretrain import PretrainConfig
from shared.protocol import MSG_PRETRAIN, PretrainReply, PretrainRequest


def test_cosine_decay_runs_from_the_stage_rate_to_its_floor() -> None:
    rates = [local_lr(1e-3, r, 5, "cosine") for r in range(1, 6)]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(LR_FLOOR * 1e-3)
    assert all(a > b for a, b in itertools.pairwise(rates))
    assert rates[2] == pytest.approx(1e-3 * (LR_FLOOR + (1 - LR_FLOOR) / 2))  # half-way: the mid-point
    assert [local_lr(1e-3, r, 5, "none") for r in range(1, 6)] == [1e-3] * 5
    assert local_lr(1e-3, 1, 1, "cosine") == 1e-3  # one round: nothing to decay


@pytest.mark.slow
def test_the_options_reach_the_sites_and_change_the_models(tiny_config: dict, site_cache: dict[str, str]) -> None:
    rounds = {"num-pretrain-rounds": 3}
    grid = run_in_process(
        {
            **tiny_config,
            **rounds,
            "site-optimizer-state": "keep",
            "local-lr-decay": "cosine",
            "balanced-class-heads": True,
        },
        num_nodes=3,
        node_configs=[site_cache] * 3,
        record=True,
    )
    sent = [PretrainRequest.from_record(ex.instruction.content) for ex in grid.log if ex.message_type == MSG_PRETRAIN]
    vae_lr = PretrainConfig().vae.lr
    by_round = {r.round: r.lr for r in sent if r.stage == "vae"}
    assert by_round == pytest.approx({r: local_lr(vae_lr, r, 3, "cosine") for r in (1, 2, 3)})
    assert all(r.keep_optimizer and r.balanced_heads for r in sent if r.stage != "latent-stats")
    # the moments stay on the nodes during pretraining only: distillation drops them
    assert not any(name.startswith("adam-") for ctx in grid.contexts.values() for name in ctx.state)
    run_dir = Path(str(tiny_config["out-dir"])) / "tiny"
    schedule = json.loads((run_dir / "metrics.json").read_text())["pretrain"]["schedule"]
    assert schedule["site_optimizer_state"] == "keep" and schedule["local_lr_decay"] == "cosine"
    assert schedule["balanced_class_heads"] is True

    kept = model_hash(load_model(run_dir / "pretrained" / "vae.pt"))
    run_in_process({**tiny_config, **rounds, "run-id": "plain"}, num_nodes=3, node_configs=[site_cache] * 3)
    plain_dir = Path(str(tiny_config["out-dir"])) / "plain"
    assert model_hash(load_model(plain_dir / "pretrained" / "vae.pt")) != kept
    scores = json.loads((plain_dir / "metrics.json").read_text())["rounds"][0]["aggregate"]["cell_weighted"]
    assert math.isfinite(scores["mlp"]["accuracy"])


@pytest.mark.slow
def test_scaffold_sends_control_variates_and_keeps_each_sites(tiny_config: dict, site_cache: dict[str, str]) -> None:
    grid = run_in_process(
        {**tiny_config, "num-pretrain-rounds": 3, "drift-control": "scaffold"},
        num_nodes=3,
        node_configs=[site_cache] * 3,
        record=True,
    )
    sent = [
        (PretrainRequest.from_record(ex.instruction.content), PretrainReply.from_record(ex.reply.content))
        for ex in grid.log
        if ex.message_type == MSG_PRETRAIN
    ]
    trained = [(q, r) for q, r in sent if q.stage in ("vae", "scdg")]
    assert trained and all(q.control is not None and r.control_delta is not None for q, r in trained)
    assert all(q.control is None and r.control_delta is None for q, r in sent if q.stage == "latent-stats")
    for stage in ("vae", "scdg"):
        firsts = [q.control for q, _ in trained if q.stage == stage and q.round == 1]
        assert firsts and all(not np.any(v) for c in firsts for v in (c or {}).values())  # SCAFFOLD starts at zero
        # round 2's server variate is the cell-weighted mean of round 1's changes (every site starts from zero)
        ones = [r for q, r in trained if q.stage == stage and q.round == 1]
        second = next(q.control for q, _ in trained if q.stage == stage and q.round == 2)
        assert second is not None
        total = sum(r.num_examples for r in ones)
        for name, value in second.items():
            expected = sum(r.num_examples * (r.control_delta or {})[name] for r in ones) / total
            np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-7)
        assert any(np.any(v) for v in second.values())
    # each node keeps its own variate for both stages; its deltas add up to it
    for ctx in grid.contexts.values():
        assert {"scaffold-vae", "scaffold-scdg"} <= set(ctx.state)
    run_dir = Path(str(tiny_config["out-dir"])) / "tiny"
    assert json.loads((run_dir / "metrics.json").read_text())["pretrain"]["schedule"]["drift_control"] == "scaffold"
