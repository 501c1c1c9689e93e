"""ClientApp handlers called directly (through Flower's routing), on a small synthetic 3-site file."""

from __future__ import annotations

import math
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from client import site as site_mod
from client import tasks
from client.app import SiteTaskError, app
from server.synthesis import fresh_models
from shared.checkpoint import model_json, state_of
from shared.errors import ConfigError, SiteDataError
from shared.evaluation import MLPTrainConfig
from shared.protocol import (
    DistillReply,
    DistillRequest,
    EvaluateReply,
    EvaluateRequest,
    Plan,
    PretrainReply,
    PretrainRequest,
    ProfileReply,
    ProfileRequest,
    SiteSpec,
)

SPEC = SiteSpec(label_key="cell_type", split_seed=0)


def _ctx(data: Path, cache: dict[str, str], partition: int = 0, **run: object) -> Context:
    run_config = {"sim-data-path": str(data), "sim-site-key": "site", "torch-threads": 1, **run}
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": partition, "num-partitions": 3, **cache},
        state=RecordDict(),
        run_config=run_config,
    )


def _send(content: RecordDict, message_type: str, ctx: Context) -> RecordDict:
    reply = app(Message(content, dst_node_id=7, message_type=message_type), ctx)
    assert reply.has_content()
    return reply.content


@pytest.fixture
def ctx(three_site_h5ad: Path, site_cache: dict[str, str]) -> Context:
    return _ctx(three_site_h5ad, site_cache)


@pytest.fixture
def plan(ctx: Context) -> Plan:
    reply = ProfileReply.from_record(_send(ProfileRequest(SPEC).to_record(), "query.profile", ctx))
    return Plan(reply.genes[:40], ("type_0", "type_1", "type_2"), SPEC)


def test_profile_reports_per_gene_aggregates_of_training_cells(ctx: Context, three_site_h5ad: Path) -> None:
    reply = ProfileReply.from_record(_send(ProfileRequest(SPEC).to_record(), "query.profile", ctx))
    assert reply.site_name == "site_a" and len(reply.genes) == 60 and reply.sums.shape == (60,)
    assert reply.n_cells == int(reply.label_counts.sum()) < 90  # 90 cells at site_a, 20 % held out
    assert set(reply.label_names) == {"type_0", "type_1", "type_2"}


def test_pretrain_vae_and_latent_stats(ctx: Context, plan: Plan) -> None:
    vae, _ = fresh_models(plan, latent_dim=8, seed=0)
    sent = state_of(vae)
    req = PretrainRequest("vae", 1, sent, model_json(vae), plan, 3, 1e-3, 16, (0.0, 0.5), 1)
    reply = PretrainReply.from_record(_send(req.to_record(), "train.pretrain", ctx))
    assert list(reply.weights) == list(sent) and reply.num_examples > 0
    assert any(not np.array_equal(reply.weights[k], sent[k]) for k in sent)
    req = PretrainRequest("latent-stats", 0, sent, model_json(vae), plan, 0, 1e-3, 16, (1.0, 1.0), 1)
    stats = PretrainReply.from_record(_send(req.to_record(), "train.pretrain", ctx))
    assert stats.latent_sum.shape == (8,) and np.all(stats.latent_sumsq >= 0)


def test_distill_returns_k_codes_per_class_and_warm_starts_from_codes_the_server_sends_back(
    ctx: Context, plan: Plan
) -> None:
    vae, scdg = fresh_models(plan, latent_dim=8, seed=0)
    args = (state_of(vae), model_json(vae), state_of(scdg), model_json(scdg), plan)
    req = DistillRequest(1, *args, {"k": 2, "iterations": 2}, 3)
    reply = DistillReply.from_record(_send(req.to_record(), "train.distill", ctx))
    assert (
        reply.codes.shape == (6, 8)
        and sorted(reply.labels.tolist()) == [0, 0, 1, 1, 2, 2]
        and reply.class_counts.shape == (3,)
    )
    # round 2 with zero iterations returns exactly the codes it started from: the warm start is what the server sent
    warm = DistillRequest(2, *args, {"k": 2, "iterations": 0}, 4, warm_codes=reply.codes, warm_labels=reply.labels)
    again = DistillReply.from_record(_send(warm.to_record(), "train.distill", ctx))
    order = np.argsort(reply.labels, kind="stable")
    assert np.array_equal(again.codes, reply.codes[order])
    cold = DistillRequest(
        2, *args, {"k": 2, "iterations": 0}, 4, warm_start=False, warm_codes=reply.codes, warm_labels=reply.labels
    )
    assert not np.allclose(
        DistillReply.from_record(_send(cold.to_record(), "train.distill", ctx)).codes, reply.codes[order]
    )
    # codes that do not fit this round (another k) are ignored, not an error
    other_k = DistillRequest(2, *args, {"k": 3, "iterations": 0}, 4, warm_codes=reply.codes, warm_labels=reply.labels)
    assert DistillReply.from_record(_send(other_k.to_record(), "train.distill", ctx)).codes.shape == (9, 8)


def test_distill_sends_its_training_class_means_only_when_asked(ctx: Context, plan: Plan) -> None:
    """recenter: the reply carries each plan class's gene means over the site's training cells; without the request's
    flag it carries none."""
    vae, scdg = fresh_models(plan, latent_dim=8, seed=0)
    args = (state_of(vae), model_json(vae), state_of(scdg), model_json(scdg), plan)
    plain = DistillReply.from_record(
        _send(DistillRequest(1, *args, {"k": 2, "iterations": 0}, 3).to_record(), "train.distill", ctx)
    )
    assert plain.class_means is None
    req = DistillRequest(1, *args, {"k": 2, "iterations": 0}, 3, send_class_means=True)
    reply = DistillReply.from_record(_send(req.to_record(), "train.distill", ctx))
    site = site_mod.load_site(
        site_mod.resolve_source(ctx.node_config, ctx.run_config),
        plan.spec,
        plan.genes,
        cache=site_mod.cache_dir(ctx.node_config),
    )
    idx, y = tasks._train_rows(site, plan)
    X = np.asarray(site.X[idx].toarray() if hasattr(site.X[idx], "toarray") else site.X[idx], np.float64)
    expected = np.stack([X[y == c].mean(0) for c in range(3)])
    assert reply.class_means is not None and reply.class_means.shape == (3, len(plan.genes))
    assert np.all(np.bincount(y, minlength=3) >= 5) and np.allclose(reply.class_means, expected, atol=1e-5)


def test_evaluate_scores_models_on_held_out_cells(ctx: Context, plan: Plan, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.synthesis import train_evaluators
    from shared import evaluation

    rng = np.random.default_rng(0)
    X, y = rng.random((12, len(plan.genes))).astype(np.float32), np.repeat([0, 1, 2], 4)
    models = train_evaluators(X, y, 3, mlp=MLPTrainConfig(min_steps=3, max_steps=3), seed=0)
    req = EvaluateRequest(  # what server.orchestration.evaluate sends
        round=1,
        X=X,
        labels=y.astype(np.int32),
        mlp=state_of(models.mlp),
        mlp_config=model_json(models.mlp),
        logreg_coef=models.coef,
        logreg_intercept=models.intercept,
        logreg_classes=models.classes,
        plan=plan,
        seed=0,
        mlp_epochs=1.0,
        mlp_min_steps=3,
        mlp_max_steps=3,
    )
    rules = []  # the site's local-only and fine-tuned MLPs follow the server MLP's rule, sent with the request
    real_train = evaluation.train_mlp
    monkeypatch.setattr(
        evaluation, "train_mlp", lambda *a, cfg, **kw: rules.append(cfg) or real_train(*a, cfg=cfg, **kw)
    )
    monkeypatch.setattr(tasks, "train_mlp", evaluation.train_mlp)
    reply = EvaluateReply.from_record(_send(req.to_record(), "evaluate.models", ctx))
    assert [(r.min_steps, r.max_steps) for r in rules] == [(3, 3), (3, 3)] and rules[1].lr == rules[0].lr / 10
    assert reply.n_test > 0 and all(0 <= s.accuracy <= 1 and len(s.recall) == 3 for s in reply.scores.values())
    assert reply.n_val > 0 and all(0 <= s.accuracy <= 1 for s in reply.val_scores.values())
    assert 0 <= reply.audit["population_mia"] <= 1 and all(math.isnan(v) or 0 <= v <= 1 for v in reply.audit.values())


def test_site_data_errors_pass_through_with_their_safe_message(
    three_site_h5ad: Path, site_cache: dict[str, str]
) -> None:
    ctx = _ctx(three_site_h5ad, site_cache)
    with pytest.raises(SiteDataError, match="label column 'nope' not found"):
        app(
            Message(
                ProfileRequest(SiteSpec(label_key="nope")).to_record(), dst_node_id=7, message_type="query.profile"
            ),
            ctx,
        )


def test_other_exceptions_reach_the_server_without_their_text(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    def leak(_site: object, _dp: object = None) -> None:
        raise ValueError("cell AAACATACAATGCC-1 has CD3E=4.2")

    monkeypatch.setattr(tasks, "profile_site", leak)
    with pytest.raises(SiteTaskError) as info:
        app(Message(ProfileRequest(SPEC).to_record(), dst_node_id=7, message_type="query.profile"), ctx)
    assert "AAAC" not in str(info.value) and "4.2" not in str(info.value) and "ValueError" in str(info.value)


def test_site_cache_is_reused_and_keyed_by_the_plan(three_site_h5ad: Path, tmp_path: Path) -> None:
    source = site_mod.resolve_source(
        {"partition-id": 1}, {"sim-data-path": str(three_site_h5ad), "sim-site-key": "site"}
    )
    first = site_mod.load_site(source, SPEC, None, cache=tmp_path)
    folders = sorted(p for p in tmp_path.glob("site-*") if p.is_dir())
    again = site_mod.load_site(source, SPEC, None, cache=tmp_path)
    assert len(folders) == 1 and again.name == first.name == "site_b" and (again.X != first.X).nnz == 0
    assert not again.X.data.flags.writeable and not again.X.data.flags.owndata  # memory-mapped read-only from the cache
    site_mod.load_site(source, SPEC, first.genes[:10], cache=tmp_path)
    assert len([p for p in tmp_path.glob("site-*") if p.is_dir()]) == 2


def test_sites_sharing_a_cache_folder_keep_their_own_seed_rows(three_site_h5ad: Path, tmp_path: Path) -> None:
    """Simulated sites (and sites on one host) share a cache folder and a run id: each must find its own seed cells."""
    run = {"sim-data-path": str(three_site_h5ad), "sim-site-key": "site"}
    a, b = (site_mod.resolve_source({"partition-id": i}, run) for i in (0, 1))
    site_mod.save_members(tmp_path, 5, a, np.array([1, 2, 3]))
    site_mod.save_members(tmp_path, 5, b, np.array([7, 8]))
    assert site_mod.load_members(tmp_path, 5, a).tolist() == [1, 2, 3] and site_mod.load_members(
        tmp_path, 5, b
    ).tolist() == [7, 8]
    assert site_mod.load_members(tmp_path, 6, a) is None  # another run: nothing stored, the seed audit is then NaN


def test_local_only_scores_are_kept_per_site_and_data_version(three_site_h5ad: Path, tmp_path: Path) -> None:
    import os
    import shutil

    data = tmp_path / "data.h5ad"
    shutil.copy(three_site_h5ad, data)
    run = {"sim-data-path": str(data), "sim-site-key": "site"}
    a, b = (site_mod.resolve_source({"partition-id": i}, run) for i in (0, 1))
    cache = tmp_path / "cache"
    cache.mkdir()
    site_mod.save_local_only(cache, a, "plan-1", {"mlp": {"accuracy": 0.9, "macro_f1": 0.8}})
    assert site_mod.load_local_only(cache, a, "plan-1") == {"mlp": {"accuracy": 0.9, "macro_f1": 0.8}}
    assert site_mod.load_local_only(cache, b, "plan-1") is None and site_mod.load_local_only(cache, a, "plan-2") is None
    st = data.stat()
    os.utime(
        data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9)
    )  # the site's file changed: its old scores no longer apply
    assert site_mod.load_local_only(cache, a, "plan-1") is None


def test_dirichlet_split_when_the_site_column_is_absent(three_site_h5ad: Path, tmp_path: Path) -> None:
    source = site_mod.resolve_source(
        {"partition-id": 1}, {"sim-data-path": str(three_site_h5ad), "sim-site-key": "nope", "sim-num-sites": 2}
    )
    assert site_mod.load_site(source, SPEC, None, cache=tmp_path).name == "site1"
    beyond = site_mod.resolve_source(
        {"partition-id": 5}, {"sim-data-path": str(three_site_h5ad), "sim-site-key": "site"}
    )
    with pytest.raises(SiteDataError, match="num-supernodes=3"):
        site_mod.load_site(beyond, SPEC, None, cache=tmp_path)


def test_deployment_identity_comes_from_node_config(three_site_h5ad: Path, tmp_path: Path) -> None:
    src = site_mod.resolve_source(
        {"data-path": str(three_site_h5ad), "site-name": "hospital-a"}, {"sim-data-path": "/ignored"}
    )
    assert src.name == "hospital-a" and src.site_key == ""
    assert site_mod.load_site(src, SPEC, None, cache=tmp_path).X.shape[0] == ad.read_h5ad(three_site_h5ad).n_obs
    with pytest.raises(ConfigError, match="node-config"):
        site_mod.resolve_source({}, {})


def test_missing_bundled_example_says_how_to_pass_the_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(site_mod, "example_path", lambda: tmp_path / "absent.h5ad")
    with pytest.raises(ConfigError, match=r"sim-data-path='/abs/path\.h5ad'"):
        site_mod.resolve_source({"partition-id": 0}, {"sim-data-path": ""})


def test_local_only_logistic_regression_of_a_large_site_fits_a_seeded_subset(
    example_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.data import prepare_site, read_h5ad
    from shared.evaluation import MLPTrainConfig

    site = prepare_site(read_h5ad(example_path), label_key="cell_type")
    tr, te = site.train_idx, site.test_idx
    args = (site.X[tr], site.labels[tr], site.X[te], site.labels[te], 5)
    fitted = []
    real_fit = tasks.fit_predict
    monkeypatch.setattr(
        tasks, "fit_predict", lambda ev, X, *a, **kw: fitted.append((ev, X.shape[0])) or real_fit(ev, X, *a, **kw)
    )
    quick = MLPTrainConfig(min_steps=5, max_steps=5)
    monkeypatch.setattr(tasks, "LOCAL_LOGREG_MAX_CELLS", 300)
    first = tasks.local_only(*args, seed=0, rule=quick)
    assert fitted == [("mlp", tr.size), ("logreg", 300)] and first == tasks.local_only(*args, seed=0, rule=quick)
    assert 0.5 < first["logreg"]["accuracy"] <= 1.0


def test_fine_tuned_scores_start_from_the_shared_model(example_path: Path) -> None:
    """The site trains the server's MLP further by the local-only rule: with a step too small to move it, its scores are
    the shared model's, not those of the same rule from a random start."""
    from shared.data import prepare_site, read_h5ad
    from shared.evaluation import MLPTrainConfig, predict_mlp, score, train_mlp

    site = prepare_site(read_h5ad(example_path), label_key="cell_type")
    tr, te = site.train_idx, site.test_idx
    shared = train_mlp(site.X[tr], site.labels[tr], 5, seed=1, cfg=MLPTrainConfig(min_steps=200, max_steps=200))
    expected = score(site.labels[te], predict_mlp(shared, site.X[te]))
    assert expected.accuracy > 0.6  # 5 classes: well above chance
    still = MLPTrainConfig(min_steps=1, max_steps=1, lr=1e-12)
    args = (site.X[tr], site.labels[tr], site.X[te], site.labels[te], 5)
    tuned = tasks.fine_tuned(shared, *args, seed=0, rule=still)
    assert tuned == {"mlp": {"accuracy": expected.accuracy, "macro_f1": expected.macro_f1}}
    assert tasks.local_only(*args, seed=0, rule=still)["mlp"]["accuracy"] < expected.accuracy - 0.2  # random start
    moved = tasks.fine_tuned(shared, *args, seed=0, rule=still)  # the shared model itself is left as it was
    assert moved == tuned and score(site.labels[te], predict_mlp(shared, site.X[te])).accuracy == expected.accuracy


def test_a_full_cache_disk_is_one_clear_error_and_leaves_nothing(
    three_site_h5ad: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    def full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    source = site_mod.resolve_source(
        {"partition-id": 0}, {"sim-data-path": str(three_site_h5ad), "sim-site-key": "site"}
    )
    with pytest.raises(SiteDataError, match="not enough disk in the site cache") as info:
        site_mod.load_site(source, SPEC, None, cache=tmp_path)
    assert "cache-dir" in str(info.value) and not list(tmp_path.iterdir())  # the half-written folder is gone


@pytest.mark.parametrize("balanced", [True, False])
def test_pretrain_hands_the_sites_class_frequencies_to_balanced_heads(
    ctx: Context, plan: Plan, monkeypatch: pytest.MonkeyPatch, balanced: bool
) -> None:
    seen: dict[str, object] = {}
    real = tasks.fit_vae

    def spy(model, X, y, cfg, **kw):
        seen["prior"], seen["labels"] = kw.get("class_prior"), np.asarray(y)
        return real(model, X, y, cfg, **kw)

    monkeypatch.setattr(tasks, "fit_vae", spy)
    vae, _ = fresh_models(plan, latent_dim=8, seed=0)
    req = PretrainRequest(
        "vae", 1, state_of(vae), model_json(vae), plan, 2, 1e-3, 16, (1.0, 1.0), 1, balanced_heads=balanced
    )
    _send(req.to_record(), "train.pretrain", ctx)
    if not balanced:
        assert seen["prior"] is None
        return
    labels = seen["labels"]
    assert isinstance(labels, np.ndarray)
    expected = np.bincount(labels, minlength=3) / labels.size
    assert np.allclose(np.asarray(seen["prior"]), expected) and expected.min() > 0
