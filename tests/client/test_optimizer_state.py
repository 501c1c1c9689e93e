"""site-optimizer-state=keep: a site's AdamW moments survive from one FedAvg round to the next, exactly, and only
for the next round of the same stage and model."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from client.app import app
from client.optimizer_state import load_carry, save_carry
from server.synthesis import fresh_models
from shared.checkpoint import model_json, state_of
from shared.fitting import AdamCarry, TrainConfig, fit_scdg
from shared.models import SCDG
from shared.protocol import Plan, PretrainRequest, ProfileReply, ProfileRequest, SiteSpec

SPEC = SiteSpec(label_key="cell_type", split_seed=0)


def _scdg_and_data() -> tuple[SCDG, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(60, 8)).astype(np.float32)
    y = rng.integers(0, 3, 60)
    plan = Plan(tuple(f"g{i}" for i in range(20)), ("a", "b", "c"), SPEC)
    _, scdg = fresh_models(plan, latent_dim=8, seed=0)
    return scdg, Z, y


def _weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_moments_kept_in_the_node_state_continue_adam_exactly() -> None:
    scdg, Z, y = _scdg_and_data()
    carry = AdamCarry()
    fit_scdg(scdg, Z, y, TrainConfig(steps=5, seed=1), adam=carry)
    assert carry.state is not None
    state = RecordDict()
    save_carry(state, "scdg", 1, model_json(scdg), carry)
    loaded = load_carry(state, "scdg", 2, model_json(scdg))
    assert loaded.state is not None
    for index, fields in carry.state["state"].items():
        for name, value in fields.items():
            assert torch.equal(loaded.state["state"][index][name], value)

    # Round 2 from the moments read back == from the moments held in memory; != from fresh moments.
    runs = {}
    for name, start in {"memory": carry, "node state": loaded, "fresh": AdamCarry()}.items():
        model, moments = copy.deepcopy(scdg), copy.deepcopy(start)
        fit_scdg(model, Z, y, TrainConfig(steps=5, seed=2), adam=moments)
        runs[name] = (_weights(model), moments)
    w_mem, w_node, w_fresh = (runs[n][0] for n in ("memory", "node state", "fresh"))
    assert all(np.array_equal(w_mem[k], w_node[k]) for k in w_mem)
    assert any(not np.array_equal(w_mem[k], w_fresh[k]) for k in w_mem)
    steps = {n: float(runs[n][1].state["state"][0]["step"]) for n in runs}
    assert steps == {"memory": 10.0, "node state": 10.0, "fresh": 5.0}


def test_moments_are_only_reused_by_the_next_round_of_the_same_model() -> None:
    scdg, Z, y = _scdg_and_data()
    carry = AdamCarry()
    fit_scdg(scdg, Z, y, TrainConfig(steps=2, seed=1), adam=carry)
    state = RecordDict()
    save_carry(state, "scdg", 3, model_json(scdg), carry)
    assert load_carry(state, "scdg", 4, model_json(scdg)).state is not None
    assert load_carry(state, "scdg", 5, model_json(scdg)).state is None  # a round was missed
    assert load_carry(state, "scdg", 3, model_json(scdg)).state is None  # the same round again (a resent round)
    assert load_carry(state, "vae", 4, model_json(scdg)).state is None  # another stage
    other = copy.deepcopy(scdg)
    other.config = type(scdg.config)(**{**scdg.config.__dict__, "hidden": scdg.config.hidden + 1})
    assert load_carry(state, "scdg", 4, model_json(other)).state is None  # another model


def _ctx(data: Path, cache: dict[str, str]) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 3, **cache},
        state=RecordDict(),
        run_config={"sim-data-path": str(data), "sim-site-key": "site", "torch-threads": 1},
    )


def _pretrain(ctx: Context, req: PretrainRequest) -> None:
    reply = app(Message(req.to_record(), dst_node_id=7, message_type="train.pretrain"), ctx)
    assert reply.has_content()


def _kept_step(ctx: Context, stage: str) -> tuple[int, float] | None:
    if f"adam-{stage}" not in ctx.state:
        return None
    info = ctx.state[f"adam-{stage}-info"]
    return int(info["round"]), float(ctx.state[f"adam-{stage}"]["0/step"].numpy().item())


@pytest.mark.parametrize("keep", [True, False])
def test_the_pretrain_handler_keeps_moments_between_rounds_only_when_asked(
    three_site_h5ad: Path, site_cache: dict[str, str], keep: bool
) -> None:
    ctx = _ctx(three_site_h5ad, site_cache)
    profile = ProfileRequest(SPEC).to_record()
    genes = ProfileReply.from_record(app(Message(profile, dst_node_id=7, message_type="query.profile"), ctx).content)
    plan = Plan(genes.genes[:40], ("type_0", "type_1", "type_2"), SPEC)
    vae, scdg = fresh_models(plan, latent_dim=8, seed=0)

    def vae_round(rnd: int) -> PretrainRequest:
        return PretrainRequest(
            "vae", rnd, state_of(vae), model_json(vae), plan, 3, 1e-3, 16, (1.0, 1.0), rnd, keep_optimizer=keep
        )

    _pretrain(ctx, vae_round(1))
    _pretrain(ctx, vae_round(2))
    if not keep:
        assert not ctx.state  # nothing is kept when the run resets the moments
        return
    assert _kept_step(ctx, "vae") == (2, 6.0)  # round 2 continued round 1's 3 steps
    _pretrain(ctx, vae_round(4))  # round 3 never reached this site: fresh moments
    assert _kept_step(ctx, "vae") == (4, 3.0)
    scdg_round = PretrainRequest(
        "scdg", 1, state_of(scdg), model_json(scdg), plan, 3, 1e-3, 16, (1.0, 1.0), 1,
        encoder=state_of(vae), encoder_config=model_json(vae), keep_optimizer=True,
    )  # fmt: skip
    _pretrain(ctx, scdg_round)
    assert _kept_step(ctx, "vae") is None and _kept_step(ctx, "scdg") == (1, 3.0)  # the VAE's moments are dropped
