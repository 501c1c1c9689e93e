"""A federation under cell-level DP: every site reports what its accountant spent; an epsilon no site can meet stops the
run early."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from anndata import read_h5ad

from server.cli.simulation import run_in_process
from server.config import FederationConfig
from server.privacy import check_report, privacy_plan
from shared.errors import ConfigError, ProtocolError
from shared.privacy.denoise import class_denoise, joint_denoise, soft_threshold_means
from shared.privacy.spec import DPSpec
from shared.protocol import (
    MSG_DISTILL,
    MSG_PRETRAIN,
    MSG_PROFILE,
    DistillReply,
    DistillRequest,
    Plan,
    PretrainReply,
    ProfileReply,
    SiteSpec,
)


@pytest.mark.slow
def test_a_dp_federation_reports_each_sites_epsilon(tiny_config: dict[str, object], site_cache: dict[str, str]) -> None:
    cfg = {
        **tiny_config,
        "dp-epsilon": 50.0,
        "dp-pretraining": "dp-sgd",
        "num-distill-rounds": 1,
        "cells-per-class": 3,
        "report": True,
    }
    grid = run_in_process(cfg, num_nodes=3, node_configs=[site_cache] * 3, record=True)
    metrics = json.loads((Path(str(cfg["out-dir"])) / "tiny" / "metrics.json").read_text())
    assert sorted(metrics["privacy"]) == sorted(metrics["sites"]) and sorted(metrics["privacy_plan"]) == sorted(
        metrics["sites"]
    )
    for site, rep in metrics["privacy"].items():
        assert 0.98 * 50 <= rep["epsilon"] <= 50.0 and 0 < rep["delta"] < 1e-2
        assert any("DP-SGD VAE: 5 steps" in m for m in rep["mechanisms"]) and any(
            "label counts" in m for m in rep["mechanisms"]
        )
        assert rep["noise_multiplier_sgd"] == pytest.approx(metrics["privacy_plan"][site]["noise_multiplier_sgd"])
    pretrain = [
        PretrainReply.from_record(e.reply.content)
        for e in grid.log
        if e.message_type == MSG_PRETRAIN and e.reply is not None
    ]
    assert pretrain and all(r.loss == 0.0 for r in pretrain)  # no loss over real cells leaves a DP site
    distill = [
        DistillReply.from_record(e.reply.content)
        for e in grid.log
        if e.message_type == MSG_DISTILL and e.reply is not None
    ]
    assert distill and all(r.privacy is not None for r in distill)
    report = (Path(str(cfg["out-dir"])) / "tiny" / "report.html").read_text()
    assert "Differential privacy spent" in report and all(f"<td>{site}</td>" in report for site in metrics["privacy"])
    run_log = (Path(str(cfg["out-dir"])) / "tiny" / "run.log").read_text()
    assert all(f"site {site}: epsilon" in run_log for site in metrics["privacy"])
    # the same run started afresh is a new run (new noise, new ledger entries), not a second release of the old one
    run_in_process(cfg, num_nodes=3, node_configs=[site_cache] * 3)
    again = json.loads((Path(str(cfg["out-dir"])) / "tiny" / "metrics.json").read_text())
    assert again["run_key"] != metrics["run_key"] and sorted(again["privacy"]) == sorted(metrics["privacy"])


def test_an_unreachable_epsilon_stops_the_run_before_training(
    tiny_config: dict[str, object], site_cache: dict[str, str]
) -> None:
    cfg = {
        **tiny_config,
        "dp-epsilon": 20.0,
        "dp-pretraining": "dp-sgd",
        "num-pretrain-rounds": 1000,
        "vae-local-steps": 100,
    }
    grid = None
    with pytest.raises(
        ConfigError, match=r"^site site_a \(\d+ cells after noise\): dp-epsilon=20 cannot be met"
    ) as err:
        grid = run_in_process(cfg, num_nodes=3, node_configs=[site_cache] * 3)
    assert grid is None and "\n" not in str(err.value)
    assert not (Path(str(cfg["out-dir"])) / "tiny" / "vae.pt").exists()  # nothing was trained


def test_privacy_plan_names_the_site_that_cannot_meet_epsilon() -> None:
    dp = DPSpec(0.2, None, 1.0, "r", rounds=30, vae_steps=100, vae_batch=128, scdg_steps=50, scdg_batch=256)
    plan = Plan(("g1", "g2"), ("a", "b"), SiteSpec(dp=dp))
    big = ProfileReply(
        "big",
        ("g1", "g2"),
        np.ones(2),
        np.ones(2),
        np.ones(2, np.int64),
        200_000,
        ("a", "b"),
        np.array([100_000, 100_000]),
    )
    small = ProfileReply(
        "small", ("g1", "g2"), np.ones(2), np.ones(2), np.ones(2, np.int64), 300, ("a", "b"), np.array([150, 150])
    )
    assert privacy_plan([big], plan)["big"]["noise_multiplier_sgd"] > 0
    with pytest.raises(ConfigError, match=r"^site small \(300 cells after noise\): dp-epsilon=0.2 cannot be met"):
        privacy_plan([big, small], plan)
    # without DP-SGD: a dp-delta so small that the releases calibrated at the public delta already overspend
    stats = Plan(("g1", "g2"), ("a", "b"), SiteSpec(dp=DPSpec(1.0, 1e-14, 1.0, "r", class_means=True)))
    with pytest.raises(
        ConfigError, match=r"^site big \(200000 cells after noise\): dp-epsilon=1 cannot be met at delta"
    ):
        privacy_plan([big], stats)
    ok = privacy_plan(
        [big], Plan(("g1", "g2"), ("a", "b"), SiteSpec(dp=DPSpec(1.0, 1e-10, 1.0, "r", class_means=True)))
    )
    assert ok["big"]["noise_multiplier_class_means"] > ok["big"]["noise_multiplier_stats"]  # more noise, still met


def test_reports_are_checked() -> None:
    good = {
        "epsilon": 7.9,
        "delta": 1e-5,
        "noise_multiplier_sgd": 1.0,
        "noise_multiplier_stats": 4.0,
        "mechanisms": ["x"],
    }
    check_report(good, dp_on=True, target=8.0)
    check_report(None, dp_on=False, target=0.0)
    for bad, on in (
        (None, True),
        (good, False),
        ({**good, "epsilon": 9.0}, True),
        ({**good, "delta": 0.0}, True),
        ({**good, "mechanisms": []}, True),
    ):
        with pytest.raises(ProtocolError):
            check_report(bad, dp_on=on, target=8.0)


@pytest.mark.slow
def test_under_statistics_pretraining_no_model_update_leaves_a_site(
    tiny_config: dict[str, object], site_cache: dict[str, str]
) -> None:
    """The DP default: one class-means release per site, the server trains the models on cells drawn around them, and
    the accountant counts no DP-SGD."""
    cfg = {**tiny_config, "dp-epsilon": 50.0, "num-distill-rounds": 1, "cells-per-class": 3}
    grid = run_in_process(cfg, num_nodes=3, node_configs=[site_cache] * 3, record=True)
    metrics = json.loads((Path(str(cfg["out-dir"])) / "tiny" / "metrics.json").read_text())
    replies = [
        PretrainReply.from_record(e.reply.content)
        for e in grid.log
        if e.message_type == MSG_PRETRAIN and e.reply is not None
    ]
    assert len(replies) == 3 and all(r.stage == "class-means" and r.weights is None for r in replies)
    assert metrics["pretrain"]["source"] == "dp-statistics" and metrics["pretrain"]["drawn_cells"] > 0
    # the sites send their raw releases; the server denoises each site's alone (dp-denoise = "site", the default) and
    # sends each site its own rows for its distillation
    assert metrics["pretrain"]["denoise"] == {"mode": "site", "shared_directions": 0}
    raw = {
        e.node_id: PretrainReply.from_record(e.reply.content)
        for e in grid.log
        if e.message_type == MSG_PRETRAIN and e.reply is not None
    }
    sent = {
        e.node_id: DistillRequest.from_record(e.instruction.content).class_means
        for e in grid.log
        if e.message_type == MSG_DISTILL
    }
    order = sorted(raw)
    name = {
        e.node_id: ProfileReply.from_record(e.reply.content).site_name
        for e in grid.log
        if e.message_type == MSG_PROFILE and e.reply is not None
    }
    noise = [metrics["privacy_plan"][name[n]]["noise_multiplier_class_means"] * 30.0 for n in order]  # clip bound 30
    expected = [
        soft_threshold_means(
            raw[n].class_means.astype(np.float64) * raw[n].class_counts[:, None], raw[n].class_counts, sd
        )
        for n, sd in zip(order, noise, strict=True)
    ]
    for n, want in zip(order, expected, strict=True):
        assert sent[n] is not None and np.allclose(sent[n], want, atol=1e-5)
        assert np.any(raw[n].class_means < 0) or not np.allclose(sent[n], raw[n].class_means, atol=1e-3)
    plan = json.loads(
        (Path(str(cfg["out-dir"])) / "tiny" / "plan.json").read_text()
    )  # the center the sites clip around
    assert len(plan["center"]) == len(plan["genes"]) and min(plan["center"]) >= 0 < max(plan["center"])
    for site, rep in metrics["privacy"].items():
        # the class means spend what the public calibration of the first releases left: the whole target
        assert 0.98 * 50.0 <= rep["epsilon"] <= 50.0 and rep["noise_multiplier_sgd"] == 0.0
        primary = metrics["privacy_plan"][site]["noise_multiplier_class_means"]
        assert primary < rep["noise_multiplier_stats"]  # small sites: less noise than the public calibration's
        assert f"Gaussian (noise multiplier {primary:.3g}): class gene means" in rep["mechanisms"]
        # no count head reads library statistics here: count sites release none (with DP-SGD they would)
        assert not any(w in m for w in ("DP-SGD", "latent moments", "library statistics") for m in rep["mechanisms"])
    assert (
        metrics["count_input"]
        and "counts" not in read_h5ad(Path(str(cfg["out-dir"])) / "tiny" / "synthetic.h5ad").layers
    )
    assert all(
        np.isnan(DistillReply.from_record(e.reply.content).library).all()
        for e in grid.log
        if e.message_type == MSG_DISTILL and e.reply is not None
    )
    assert metrics["rounds"][-1]["aggregate"]["cell_weighted"]["mlp"]["accuracy"] > 0
    # decode-mode auto: each code becomes samples-per-code (10) cells drawn around its expected expression
    codes = sum(
        len(DistillReply.from_record(e.reply.content).labels)
        for e in grid.log
        if e.message_type == MSG_DISTILL and e.reply is not None
    )
    synthetic = read_h5ad(Path(str(cfg["out-dir"])) / "tiny" / "synthetic.h5ad")
    assert json.loads(synthetic.uns["fedscdd"]["provenance_json"])["decode"] == "gaussian"
    assert synthetic.n_obs == 10 * codes == metrics["rounds"][-1]["n_synthetic"]
    X, expected = synthetic.X.toarray(), synthetic.layers["expected"].toarray()
    assert (X >= 0).all() and not np.allclose(X, expected, atol=1e-3)
    # dp-recenter (default true): each site's cells of a class are drawn around the class mean it released, as
    # denoised and sent back to it, not around the decoder's own expression (kept in layers["expected"])
    site_of = synthetic.obs["site"].to_numpy()
    label_of = synthetic.obs["cell_type"].cat.codes.to_numpy()
    closer = []  # per (site, class): mean |gap| to the sent mean of X's class mean, and of the expected layer's
    for n in order:
        for c in np.unique(label_of[site_of == name[n]]):
            rows = (site_of == name[n]) & (label_of == c)
            want = np.asarray(sent[n][c], np.float64)
            closer.append(
                (float(np.abs(X[rows].mean(0) - want).mean()), float(np.abs(expected[rows].mean(0) - want).mean()))
            )
    assert closer and all(x < 0.3 and x < 0.25 * e for x, e in closer)


def test_run_config_dp_keys() -> None:
    stats = FederationConfig.from_run_config({"dp-epsilon": 4}).site_spec("run-x").dp
    assert FederationConfig.from_run_config({"dp-epsilon": 4}).dp_recenter  # the default
    assert not FederationConfig.from_run_config({"dp-epsilon": 4, "dp-recenter": False}).dp_recenter
    assert stats.rounds == 0 and stats.class_means  # the default: no DP-SGD, the class means released once
    cfg = FederationConfig.from_run_config(
        {"dp-epsilon": 4, "dp-delta": 1e-6, "dp-max-grad-norm": 0.5, "dp-pretraining": "dp-sgd"}
    )
    spec = cfg.site_spec("run-x").dp
    assert (
        spec.enabled
        and spec.run_key == "run-x"
        and spec.rounds == 30
        and spec.vae_steps == 100
        and spec.vae_batch == 128
    )
    assert spec.class_means  # under DP the distillation matches the released class means at every k
    assert FederationConfig().site_spec("r").dp == DPSpec()
    for bad in (
        {"dp-epsilon": -1},
        {"dp-epsilon": 1, "dp-delta": 0.5},
        {"dp-epsilon": 1, "dp-max-grad-norm": 0},
        {"dp-epsilon": 1, "dp-pretraining": "sgd"},
        {"dp-epsilon": 1, "dp-denoise": "both"},  # site, joint or class
        {"dp-epsilon": 1, "init-path": "/some/reference"},  # init-path starts FedAvg, which statistics replaces
    ):
        with pytest.raises(ConfigError, match="dp-"):
            FederationConfig.from_run_config(bad)
    FederationConfig.from_run_config({"dp-epsilon": 1, "dp-pretraining": "dp-sgd", "init-path": "/some/reference"})


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["joint", "class"])
def test_a_resumed_dp_run_asks_the_sites_for_the_same_class_means_again(
    mode: str,
    tiny_config: dict[str, object],
    site_cache: dict[str, str],
    interrupt_at_round: Callable[[int], Callable[[], None]],
) -> None:
    """The denoised class means are not checkpointed: after a resume the coordinator asks every site for its release
    again (the same request, so the same noised numbers and nothing new for the accountant), denoises them together
    (dp-denoise = "joint", or "class": each class over the sites) and sends each its rows."""
    cfg = {**tiny_config, "dp-epsilon": 50.0, "num-distill-rounds": 2, "cells-per-class": 3, "dp-denoise": mode}
    let_through = interrupt_at_round(2)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(cfg, num_nodes=3, node_configs=[site_cache] * 3)
    let_through()
    grid = run_in_process({**cfg, "resume": True}, num_nodes=3, node_configs=[site_cache] * 3, record=True)
    asked = {
        e.node_id: PretrainReply.from_record(e.reply.content)
        for e in grid.log
        if e.message_type == MSG_PRETRAIN and e.reply is not None
    }
    assert len(asked) == 3 and all(r.stage == "class-means" for r in asked.values())  # asked again, nothing trained
    metrics = json.loads((Path(str(cfg["out-dir"])) / "tiny" / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2] and not metrics["dropped"]  # no site refused the request
    name = {
        e.node_id: ProfileReply.from_record(e.reply.content).site_name
        for e in grid.log
        if e.message_type == MSG_PROFILE and e.reply is not None
    }
    order = sorted(asked)
    noise = [metrics["privacy_plan"][name[n]]["noise_multiplier_class_means"] * 30.0 for n in order]
    raw = [asked[n].class_means.astype(np.float64) for n in order]
    expected, kept = (
        joint_denoise(raw, [asked[n].class_counts for n in order], noise)
        if mode == "joint"
        else (class_denoise(raw, [asked[n].class_counts for n in order], noise), 0)
    )
    assert metrics["pretrain"]["denoise"] == {"mode": mode, "shared_directions": kept}
    sent = {
        e.node_id: DistillRequest.from_record(e.instruction.content).class_means
        for e in grid.log
        if e.message_type == MSG_DISTILL
    }
    for n, want in zip(order, expected, strict=True):
        assert sent[n] is not None and np.allclose(sent[n], want, atol=1e-5)
