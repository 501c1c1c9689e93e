"""Aggregation rules of federated pretraining: class-aware averaging, server optimisers (against flwr's own),
FedProx."""

from __future__ import annotations

from itertools import pairwise
from unittest import mock

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi

from server.aggregation import ServerOptimizer, average
from shared.fitting import TrainConfig, anchor_of, fit_scdg, fit_vae
from shared.models import SCDG, VAE, SCDGConfig, VAEConfig


def _states(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    return [
        {
            "head.weight": rng.normal(size=(4, 3)).astype(np.float32),
            "head.bias": rng.normal(size=4).astype(np.float32),
            "body": rng.normal(size=(2, 2)).astype(np.float32),
        }
        for _ in range(n)
    ]


def test_class_rows_are_averaged_over_the_sites_that_have_the_class_only() -> None:
    rng = np.random.default_rng(0)
    states, weights = _states(rng, 3), [10.0, 30.0, 60.0]
    previous = _states(rng, 1)[0]
    have = [{0, 1}, {1}, {1, 2}]  # class 3: no site has it
    out = average(
        states, weights, site_classes=have, class_rows=("head.weight", "head.bias"), n_classes=4, previous=previous
    )
    np.testing.assert_allclose(out["head.weight"][0], states[0]["head.weight"][0], rtol=1e-6)  # only site 0 has class 0
    np.testing.assert_allclose(
        out["head.weight"][1],
        sum(w * s["head.weight"][1] for w, s in zip([0.1, 0.3, 0.6], states, strict=True)),
        rtol=1e-5,
    )
    np.testing.assert_allclose(out["head.bias"][2], states[2]["head.bias"][2], rtol=1e-6)
    np.testing.assert_array_equal(out["head.weight"][3], previous["head.weight"][3])  # absent everywhere: untouched
    np.testing.assert_array_equal(out["head.bias"][3], previous["head.bias"][3])
    plain = average(states, weights)
    np.testing.assert_allclose(out["body"], plain["body"], rtol=1e-6)  # other parameters: plain FedAvg
    assert not np.allclose(out["head.weight"][0], plain["head.weight"][0])


def test_class_rows_of_the_real_models_and_a_null_class_row_left_to_fedavg() -> None:
    vae, scdg = VAE(VAEConfig(n_genes=20, latent_dim=4, n_classes=3)), SCDG(SCDGConfig(latent_dim=4, n_classes=3))
    for model in (vae, scdg):
        params = dict(model.named_parameters())
        assert all(params[k].shape[0] >= 3 for k in model.class_rows)
    states = [{k: v.detach().numpy() + i for k, v in scdg.state_dict().items()} for i in range(2)]
    out = average(
        states, [1.0, 1.0], site_classes=[{0}, {0, 1}], class_rows=scdg.class_rows, n_classes=3, previous=states[0]
    )
    np.testing.assert_allclose(
        out["class_emb.weight"][3], (states[0]["class_emb.weight"][3] + states[1]["class_emb.weight"][3]) / 2, rtol=1e-6
    )
    np.testing.assert_allclose(out["class_emb.weight"][1], states[1]["class_emb.weight"][1], rtol=1e-6)


def _flower_step(
    strategy: FedAvg, current: dict[str, np.ndarray], averaged: dict[str, np.ndarray], rnd: int
) -> dict[str, np.ndarray]:
    """One aggregation of flwr's strategy, its FedAvg part replaced by the given average (the part both sides share)."""
    if isinstance(strategy, FedAvgM):  # what configure_train would have stored
        strategy.current_arrays = ArrayRecord({k: Array(v.copy()) for k, v in current.items()})
    else:
        strategy.current_arrays = {k: v.copy() for k, v in current.items()}
    record = ArrayRecord({k: Array(v) for k, v in averaged.items()})
    with mock.patch.object(FedAvg, "aggregate_train", return_value=(record, None)):
        out, _ = strategy.aggregate_train(rnd, [])
    assert out is not None
    return {k: a.numpy() for k, a in out.items()}


@pytest.mark.parametrize(
    ("kind", "flower"),
    [
        ("fedadam", FedAdam(eta=1e-2, beta_1=0.9, beta_2=0.99, tau=1e-3)),
        ("fedyogi", FedYogi(eta=1e-2, beta_1=0.9, beta_2=0.99, tau=1e-3)),
        ("fedavgm", FedAvgM(server_learning_rate=0.5, server_momentum=0.9)),
    ],
)
def test_server_optimizer_steps_as_flowers_strategy(kind: str, flower: FedAvg) -> None:
    rng = np.random.default_rng(1)
    current = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=3)}
    ours = ServerOptimizer(kind, 0.5 if kind == "fedavgm" else 1e-2, beta_1=0.9, beta_2=0.99, tau=1e-3)
    for rnd in (1, 2, 3):
        averaged = {k: v + rng.normal(scale=0.1, size=v.shape) for k, v in current.items()}
        expected = _flower_step(flower, current, averaged, rnd)
        got = ours.step(current, averaged)
        for k in current:
            np.testing.assert_allclose(got[k], expected[k], rtol=1e-10, atol=1e-12)
        assert not np.allclose(got["w"], averaged["w"])  # the server step is not plain averaging
        current = got


def test_fedavgm_accumulates_momentum_and_fedavg_takes_the_average() -> None:
    current, averaged = {"w": np.zeros(2)}, {"w": np.ones(2)}
    opt = ServerOptimizer("fedavgm", 1.0, beta_1=0.5)
    first = opt.step(current, averaged)
    np.testing.assert_allclose(first["w"], [1.0, 1.0])  # first round: the pseudo-gradient itself
    second = opt.step(first, {"w": first["w"] + 1.0})
    np.testing.assert_allclose(second["w"], [2.5, 2.5])  # 1 + (0.5 * 1 + 1)
    np.testing.assert_allclose(ServerOptimizer("fedavg").step(current, averaged)["w"], averaged["w"])


def test_server_optimizer_leaves_buffers_and_refuses_bad_settings() -> None:
    opt = ServerOptimizer("fedadam", 1e-2, params=frozenset({"w"}))
    out = opt.step(
        {"w": np.zeros(2), "buf": np.zeros(2), "n": np.array([1])},
        {"w": np.ones(2), "buf": np.full(2, 5.0), "n": np.array([3])},
    )
    np.testing.assert_array_equal(out["buf"], [5.0, 5.0])  # not a parameter: the average
    np.testing.assert_array_equal(out["n"], [3])
    assert 0 < out["w"][0] < 1
    with pytest.raises(ValueError, match="server-optimizer"):
        ServerOptimizer("sgd")
    with pytest.raises(ValueError, match="learning rate"):
        ServerOptimizer("fedadam", 0.0)


def test_proximal_term_is_non_zero_and_pulls_the_weights_back() -> None:
    rng = np.random.default_rng(0)
    X = rng.poisson(1.0, size=(64, 20)).astype(np.float32)
    y = rng.integers(0, 3, size=64)
    cfg = TrainConfig(steps=40, lr=1e-2, batch_size=32)

    def drift(weight: float) -> float:
        torch.manual_seed(0)
        model = VAE(VAEConfig(n_genes=20, latent_dim=4, n_classes=3))
        start = anchor_of(model)
        fit_vae(model, X, y, cfg, anchor=start, anchor_weight=weight)
        return float(sum(((p.detach() - start[k]) ** 2).sum() for k, p in model.named_parameters()))

    assert drift(5.0) < 0.5 * drift(0.0)  # the term carries gradient: the weights stay nearer the global ones
    torch.manual_seed(0)
    scdg = SCDG(SCDGConfig(latent_dim=4, n_classes=3))
    start = anchor_of(scdg)
    with torch.no_grad():
        for p in scdg.parameters():
            p.add_(0.1)
    from shared.fitting import _pull

    term = _pull(dict(scdg.named_parameters()), start, 0.5)
    assert term is not None and term.item() > 0 and term.requires_grad
    term.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scdg.parameters())
    assert fit_scdg(
        scdg, rng.normal(size=(64, 4)).astype(np.float32), y, TrainConfig(steps=5), anchor=start, anchor_weight=0.5
    )


def test_the_kl_warm_up_spans_all_rounds_as_in_pooled_training() -> None:
    from server.fedavg import kl_ramp

    ramps = [kl_ramp(r, 10) for r in range(1, 11)]
    assert ramps[0] == (0.0, 1 / 3) and ramps[1] == (1 / 3, 2 / 3) and ramps[2] == (2 / 3, 1.0)  # 30 % of 10 rounds
    assert all(r == (1.0, 1.0) for r in ramps[3:])
    assert all(a[1] == b[0] for a, b in pairwise(ramps))  # continuous across rounds
    assert kl_ramp(1, 1) == (0.0, 1.0)


def test_balanced_heads_leave_a_class_the_site_lacks_alone_and_bias_nothing_at_inference() -> None:
    """Balanced softmax (FedLC-style logit calibration): with the site's class frequencies on the logits, training on
    cells of classes 0 and 1 only barely moves class 2's rows; plain cross-entropy pushes them down."""
    from shared.fitting import balanced_heads, class_frequencies

    rng = np.random.default_rng(0)
    X = np.abs(rng.normal(size=(200, 30))).astype(np.float32)
    y = rng.integers(0, 2, 200)  # class 2 of 3 absent
    prior = class_frequencies(y, 3)
    assert prior[2] == 0 and prior[:2].sum() == pytest.approx(1.0)
    moved = {}
    for balanced in (False, True):
        torch.manual_seed(0)
        vae = VAE(VAEConfig(n_genes=30, latent_dim=4, n_classes=3))
        head = vae.label_head
        assert head is not None
        before = head.bias.detach().clone()
        fit_vae(vae, X, y, TrainConfig(steps=60, batch_size=32), class_prior=prior if balanced else None)
        moved[balanced] = float(before[2] - head.bias.detach()[2])
        assert vae.train_logit_offset is None  # only during training
    assert moved[False] > 0.02 and abs(moved[True]) < 0.2 * moved[False]

    # inside the block the loss is cross-entropy on logits + log(prior) (with the floor for absent classes)
    vae = VAE(VAEConfig(n_genes=30, latent_dim=4, n_classes=3))
    vae.eval()
    x, labels = torch.from_numpy(X[:8]), torch.from_numpy(y[:8])
    with balanced_heads(vae, prior):
        got = vae.loss(x, labels).label
    assert vae.label_head is not None
    logits = vae.label_head(vae.encode(x)[0]) + torch.log(torch.tensor(np.maximum(prior, 1e-30), dtype=torch.float32))
    assert float(got.detach()) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, labels).detach()), rel=1e-5
    )


def test_balanced_heads_train_the_generators_qa_head_too() -> None:
    from shared.fitting import class_frequencies

    rng = np.random.default_rng(1)
    Z, y = rng.normal(size=(128, 4)).astype(np.float32), rng.integers(0, 2, 128)
    moved = {}
    for balanced in (False, True):
        torch.manual_seed(0)
        scdg = SCDG(SCDGConfig(latent_dim=4, n_classes=3, hidden=32))
        last = scdg.qa[-1]
        before = last.bias.detach().clone()
        fit_scdg(
            scdg, Z, y, TrainConfig(steps=60, batch_size=32), class_prior=class_frequencies(y, 3) if balanced else None
        )
        moved[balanced] = float(before[2] - last.bias.detach()[2])
        assert scdg.train_logit_offset is None
    assert moved[False] > 0.02 and abs(moved[True]) < 0.2 * moved[False]
