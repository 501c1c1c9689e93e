"""A site under DP: what it releases is noised, keyed by the run, bounded by its plan, and its codes never read one
cell."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from client import privacy, tasks
from client.privacy import SiteDP
from client.site import SiteData, load_profile, load_site, resolve_source
from server.synthesis import fresh_models
from shared.checkpoint import model_json, state_of
from shared.errors import ProtocolError
from shared.privacy.accounting import PRIMARY
from shared.privacy.denoise import soft_threshold_means
from shared.privacy.mechanisms import LOG_LIBRARY_MAX, site_secret
from shared.privacy.spec import DPSpec
from shared.protocol import DistillRequest, Plan, PretrainRequest, SiteSpec

# A large epsilon: the three-site file has ~20 training cells per class, and label names need to pass the noise
# threshold.
DP = DPSpec(
    50.0, None, 1.0, "run-test", rounds=2, vae_steps=3, vae_batch=16, scdg_steps=3, scdg_batch=16, class_means=True
)
SPEC = SiteSpec(label_key="cell_type", split_seed=0, dp=DP)


@pytest.fixture
def site(three_site_h5ad: Path, tmp_path: Path) -> SiteData:
    source = resolve_source({"partition-id": 0}, {"sim-data-path": str(three_site_h5ad), "sim-site-key": "site"})
    return load_site(source, SPEC, None, cache=tmp_path)


def _dp(tmp_path: Path, spec: DPSpec = DP) -> SiteDP:
    return SiteDP(spec, site_secret(tmp_path), tmp_path, "site-a")


def _plan(site: SiteData, spec: DPSpec = DP) -> Plan:
    return Plan(site.genes, ("type_0", "type_1", "type_2"), dataclasses.replace(SPEC, dp=spec))


def test_profile_is_noised_the_same_way_within_a_run_and_afresh_in_another(site: SiteData, tmp_path: Path) -> None:
    exact = tasks.profile_site(site)
    noised = tasks.profile_site(site, _dp(tmp_path))
    assert noised.sums.shape == exact.sums.shape and not np.allclose(noised.sums, exact.sums)
    assert set(noised.label_names) <= set(exact.label_names) and noised.n_cells == int(noised.label_counts.sum())
    assert np.all(noised.detected >= 0) and np.all(noised.detected <= noised.n_cells) and np.all(noised.sumsq >= 0)
    again = tasks.profile_site(site, _dp(tmp_path))
    assert np.array_equal(again.sums, noised.sums) and np.array_equal(again.label_counts, noised.label_counts)
    other_run = tasks.profile_site(site, _dp(tmp_path, dataclasses.replace(DP, run_key="run-other")))
    assert not np.allclose(other_run.sums, noised.sums)
    # the noise is of the calibrated size: sums of clipped rows move by sigma x bound x sqrt(3) per gene
    sigma = privacy.budget(site, _plan(site), _dp(tmp_path)).noise.stats
    resid = (noised.sums - exact.sums)[exact.sums > 0.0]
    assert 0.3 < np.std(resid) / (sigma * 60.0 * np.sqrt(3)) < 3.0


def _changed_cell(site: SiteData) -> SiteData:
    """The same site with one training cell's expression replaced by an extreme one."""
    X = site.X.tolil(copy=True)
    row = int(site.train_idx[0])
    X[row, :] = 0.0
    X[row, :5] = 9.0
    return dataclasses.replace(site, X=sp.csr_matrix(X))


def _distill(site: SiteData, plan: Plan, dp: SiteDP, k: int, **config: str) -> np.ndarray:
    vae, scdg = fresh_models(plan, latent_dim=8, seed=0)
    fields = {"k": k, "iterations": 3, **config}
    req = DistillRequest(1, state_of(vae), model_json(vae), state_of(scdg), model_json(scdg), plan, fields, 3)
    reply, _ = tasks.distill_site(site, req, dp)
    assert reply.privacy is not None and 0 < reply.privacy["epsilon"] <= DP.epsilon * 1.001
    return reply.codes


def test_codes_under_dp_depend_on_one_cell_only_through_the_released_means(
    site: SiteData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(site)
    released = []
    real = privacy.class_gene_means
    monkeypatch.setattr(privacy, "class_gene_means", lambda *a, **kw: released.append(real(*a, **kw)) or released[-1])
    a = _distill(site, plan, _dp(tmp_path), k=10)
    b = _distill(_changed_cell(site), plan, _dp(tmp_path), k=10)
    assert not np.array_equal(released[0], released[1]) and not np.array_equal(
        a, b
    )  # the changed cell moved the noised means
    # given the same released means, the changed cell makes no difference: codes start from noise, the objective
    # reads no cell, and the class counts come from the (unchanged) noised release
    monkeypatch.setattr(privacy, "class_gene_means", lambda *a, **kw: released[0])
    assert np.array_equal(_distill(_changed_cell(site), plan, _dp(tmp_path), k=10), a)
    # a request for codes started from real cells' latents or their k-means centres is answered from noise all the same
    for init in ("real", "kmeans"):
        assert np.array_equal(_distill(_changed_cell(site), plan, _dp(tmp_path), k=10, init=init), a)


def _models(plan: Plan) -> tuple:
    vae, scdg = fresh_models(plan, latent_dim=8, seed=0)
    return state_of(vae), model_json(vae), state_of(scdg), model_json(scdg)


def test_codes_match_the_coordinators_denoised_means_when_it_sends_them(site: SiteData, tmp_path: Path) -> None:
    """Under statistics pretraining the coordinator denoises every site's release together and sends each site its own
    rows: the site matches those (post-processing of releases), and its own denoising only when none came."""
    plan = _plan(site)
    vae, scdg = fresh_models(plan, latent_dim=8, seed=0)
    req = DistillRequest(1, state_of(vae), model_json(vae), state_of(scdg), model_json(scdg), plan, {"k": 10}, 3)
    dp = _dp(tmp_path)
    y, ok = site.global_labels(plan.classes)
    idx = site.train_idx[ok[site.train_idx]]
    counts = privacy.plan_counts(site, plan, dp)
    own = privacy.class_gene_means(site.X[idx], y[idx], counts, dp, privacy.budget(site, plan, dp).sigma(PRIMARY))
    alone = tasks.distill_site(site, req, dp)[0].codes
    same = tasks.distill_site(site, dataclasses.replace(req, class_means=own), dp)[0].codes
    assert np.array_equal(same, alone)
    other = tasks.distill_site(site, dataclasses.replace(req, class_means=own * 1.5), dp)[0].codes
    assert not np.allclose(other, alone)


def test_class_means_move_by_at_most_the_clipping_bound(site: SiteData, tmp_path: Path) -> None:
    plan = _plan(site)
    dp = _dp(tmp_path)
    y, ok = site.global_labels(plan.classes)
    idx = site.train_idx[ok[site.train_idx]]
    counts = privacy.plan_counts(site, plan, dp)
    sigma = privacy.budget(site, plan, dp).noise.stats
    X_plan = site.X[idx]
    a = privacy.class_gene_sums(X_plan, y[idx], 3, dp, sigma)
    b = privacy.class_gene_sums(_changed_cell(site).X[idx], y[idx], 3, dp, sigma)
    moved = np.linalg.norm(a - b)
    assert 0 < moved <= 2 * 60.0 + 1e-3  # two clipped rows (the old cell out, the new one in) of norm <= GENE_NORM
    means = privacy.class_gene_means(X_plan, y[idx], counts, dp, sigma)  # post-processing of the same release
    assert np.array_equal(means, soft_threshold_means(a, counts, sigma * 60.0).astype(np.float32))
    # around the plan's center each cell's difference to it is clipped to CENTERED_NORM (30): half the noise
    center = np.asarray(X_plan.mean(0)).ravel()
    a = privacy.class_gene_sums(X_plan, y[idx], 3, dp, sigma, center)
    b = privacy.class_gene_sums(_changed_cell(site).X[idx], y[idx], 3, dp, sigma, center)
    assert 0 < np.linalg.norm(a - b) <= 2 * 30.0 + 1e-3
    means = privacy.class_gene_means(X_plan, y[idx], counts, dp, sigma, center)
    sums = a + counts[:, None] * center  # back to sums of cells with the released counts
    assert np.array_equal(means, soft_threshold_means(sums, counts, sigma * 30.0).astype(np.float32))


def test_pretraining_stays_within_the_dp_plan(site: SiteData, tmp_path: Path) -> None:
    plan = _plan(site)
    dp = _dp(tmp_path)
    vae, _ = fresh_models(plan, latent_dim=8, seed=0)
    req = PretrainRequest("vae", 1, state_of(vae), model_json(vae), plan, 3, 1e-3, 16, (0.0, 0.5), 1)
    reply = tasks.pretrain_site(site, req, dp)
    noised_n = round(privacy.budget(site, plan, dp).n_cells)
    assert reply.loss == 0.0 and reply.num_examples == noised_n
    assert (
        tasks.pretrain_site(site, req, dp).weights["to_mu.weight"].tobytes() == reply.weights["to_mu.weight"].tobytes()
    )  # a retry
    for bad in (
        dataclasses.replace(req, round=3),
        dataclasses.replace(req, steps=4),
        dataclasses.replace(req, batch_size=32),
    ):
        with pytest.raises(ProtocolError, match="outside the run's DP plan"):
            tasks.pretrain_site(site, bad, dp)
    other = dataclasses.replace(req, weights={k: v + 1.0 for k, v in req.weights.items()})
    with pytest.raises(ProtocolError, match="already released"):
        tasks.pretrain_site(site, other, dp)


def test_objectives_that_read_cells_are_refused_under_dp(site: SiteData, tmp_path: Path) -> None:
    plan = _plan(site)
    req = DistillRequest(1, *_models(plan), plan, {"k": 10, "iterations": 1, "mmd_weight": 1.0}, 3)
    with pytest.raises(ProtocolError, match="read real cells directly"):
        tasks.distill_site(site, req, _dp(tmp_path))
    unbudgeted = _plan(
        site, dataclasses.replace(DP, class_means=False)
    )  # under DP the objective matches the released class means
    req = DistillRequest(1, *_models(unbudgeted), unbudgeted, {"k": 10, "iterations": 1}, 3)
    with pytest.raises(ProtocolError, match="did not budget"):
        tasks.distill_site(site, req, _dp(tmp_path, unbudgeted.spec.dp))
    # recenter's plain class means would bypass the DP release
    req = DistillRequest(1, *_models(plan), plan, {"k": 10, "iterations": 1}, 3, send_class_means=True)
    with pytest.raises(ProtocolError, match="only through its DP plan's release"):
        tasks.distill_site(site, req, _dp(tmp_path))


def test_the_class_means_release_is_the_one_distillation_matches(site: SiteData, tmp_path: Path) -> None:
    """dp-pretraining=statistics: the pretraining release is the distillation's class means (same noise: no extra
    cost), refused without DP, outside the plan, or with other content."""
    spec = dataclasses.replace(DP, rounds=0)
    plan, dp = _plan(site, spec), _dp(tmp_path, spec)
    vae, _ = fresh_models(plan, latent_dim=8, seed=0)
    req = PretrainRequest("class-means", 0, state_of(vae), model_json(vae), plan, 0, 1e-3, 1, (1.0, 1.0), 1)
    reply = tasks.pretrain_site(site, req, dp)
    counts = privacy.plan_counts(site, plan, dp)
    y, ok = site.global_labels(plan.classes)
    idx = site.train_idx[ok[site.train_idx]]
    sigma = privacy.budget(site, plan, dp).sigma(PRIMARY)
    matched = privacy.class_gene_means(site.X[idx], y[idx], counts, dp, sigma, raw=True)
    assert reply.class_means is not None and reply.class_counts is not None
    assert np.array_equal(reply.class_counts, counts) and np.array_equal(reply.class_means, matched)
    # raw: the coordinator denoises it (with every site's); the site's own denoising is post-processing of the same
    own = privacy.class_gene_means(site.X[idx], y[idx], counts, dp, sigma)
    redone = soft_threshold_means(reply.class_means.astype(np.float64) * counts[:, None], counts, sigma * 60.0)
    assert np.allclose(own, redone, atol=1e-4) and not np.allclose(own, reply.class_means, atol=1e-3)
    assert reply.loss == 0.0 and reply.weights is None
    exact = np.stack([np.asarray(site.X[idx][y[idx] == c].mean(0)).ravel() for c in range(3)])
    assert not np.allclose(reply.class_means, exact)  # noised
    assert np.array_equal(tasks.pretrain_site(site, req, dp).class_means, reply.class_means)  # a retry: same release
    other = dataclasses.replace(req, weights={k: v + 1 for k, v in req.weights.items()})  # the release reads no model
    assert np.array_equal(tasks.pretrain_site(site, other, dp).class_means, reply.class_means)
    moved = dataclasses.replace(plan, center=tuple(0.5 for _ in plan.genes))  # the same noise around another center
    with pytest.raises(ProtocolError, match="already released"):  # would let the two releases be subtracted
        tasks.pretrain_site(site, dataclasses.replace(req, plan=moved), dp)
    with pytest.raises(ProtocolError, match="only under DP"):
        tasks.pretrain_site(site, req)
    unbudgeted = dataclasses.replace(spec, class_means=False)
    with pytest.raises(ProtocolError, match="not part of the run's DP plan"):
        tasks.pretrain_site(site, dataclasses.replace(req, plan=_plan(site, unbudgeted)), _dp(tmp_path, unbudgeted))
    with pytest.raises(ProtocolError, match="not part of the run's DP plan"):  # no DP-SGD rounds: no latent moments
        tasks.pretrain_site(site, dataclasses.replace(req, stage="latent-stats"), dp)


def test_a_profile_cached_without_dp_is_completed_for_a_dp_run(three_site_h5ad: Path, tmp_path: Path) -> None:
    source = resolve_source({"partition-id": 0}, {"sim-data-path": str(three_site_h5ad), "sim-site-key": "site"})
    plain = load_profile(source, dataclasses.replace(SPEC, dp=DPSpec()), cache=tmp_path)
    assert plain.clipped.shape[0] == 0
    private = load_profile(source, SPEC, cache=tmp_path)  # the same cache file: DP needs the clipped sums too
    assert private.clipped.shape == (3, len(private.genes)) and np.array_equal(private.sums, plain.sums)
    assert tasks.profile_site(private, _dp(tmp_path)).n_cells > 0
    assert load_profile(source, dataclasses.replace(SPEC, dp=DPSpec()), cache=tmp_path).clipped.shape[0] == 3


def test_class_means_of_an_unreleased_class_are_zero(site: SiteData, tmp_path: Path) -> None:
    plan, dp = _plan(site), _dp(tmp_path)
    y, ok = site.global_labels(plan.classes)
    idx = site.train_idx[ok[site.train_idx]]
    counts = privacy.plan_counts(site, plan, dp)
    counts[1] = 0  # as if class 1's noised count had stayed below the name threshold
    sigma = privacy.budget(site, plan, dp).noise.stats
    means = privacy.class_gene_means(site.X[idx], y[idx], counts, dp, sigma)
    assert np.all(means[1] == 0) and np.any(means[0] > 0) and np.any(means[2] > 0)


def test_noised_library_statistics_stay_within_what_the_coordinator_accepts(site: SiteData, tmp_path: Path) -> None:
    """A small class's noised second moment can imply a spread no value in [0, 1] has; the release is bounded, so the
    coordinator does not refuse the site's distill reply (it dropped kang's stim107 at epsilon 8 before)."""
    from server.validation import _check_library

    assert site.has_counts
    plan = _plan(site)
    y, ok = site.global_labels(plan.classes)
    idx = site.train_idx[ok[site.train_idx]]
    counts = np.bincount(y[idx], minlength=len(plan.classes))
    sds = []
    for run in range(20):  # noise afresh for every run key; sigma 5: ~0.4 of noise on a class's second moment
        dp = _dp(tmp_path, dataclasses.replace(DP, run_key=f"run-{run}"))
        stats = privacy.library_stats(site.X[idx], site.library[idx], y[idx], counts, dp, 5.0)
        _check_library(stats, counts)
        sds.append(stats[:, 1])
    assert np.max(sds) == pytest.approx(0.5 * LOG_LIBRARY_MAX)  # the bound is reached: without it the check above fails


def test_a_run_without_a_count_head_gets_no_library_statistics(site: SiteData, tmp_path: Path) -> None:
    """Under statistics pretraining (``library_stats`` off) a count site sends NaN library rows, as a site without
    counts does, and its accountant counts no such release; with it on the same site releases them."""
    assert site.has_counts
    stats_only = dataclasses.replace(DP, rounds=0, library_stats=False)
    for spec, released in ((stats_only, False), (dataclasses.replace(stats_only, library_stats=True), True)):
        plan = _plan(site, spec)
        vae, scdg = fresh_models(plan, latent_dim=8, seed=0)
        req = DistillRequest(1, state_of(vae), model_json(vae), state_of(scdg), model_json(scdg), plan, {"k": 2}, 3)
        reply = tasks.distill_site(site, req, _dp(tmp_path / str(released), spec))[0]
        assert bool(np.isfinite(reply.library).any()) is released
        assert reply.privacy is not None
        named = any("library statistics" in m for m in reply.privacy["mechanisms"])
        assert named is released
        assert float(reply.privacy["epsilon"]) == pytest.approx(spec.epsilon, rel=0.01)
