"""FederationConfig: empty config works, pyproject keys map 1:1, unknown keys and bad values are refused."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from server.config import FederationConfig
from server.orchestration import distill_config
from shared.errors import ConfigError

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _app_config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_empty_run_config_gives_defaults() -> None:
    cfg = FederationConfig.from_run_config({})
    assert cfg == FederationConfig() and cfg.min_sites == 2 and cfg.cells_per_class == 10


def test_pyproject_keys_are_exactly_the_config_keys_and_valid() -> None:
    app = _app_config()
    assert set(app) == set(FederationConfig.keys())
    cfg = FederationConfig.from_run_config(app)
    assert (
        cfg.sim_site_key == "batch"
        and cfg.latent_dim is None
        and cfg.n_genes == 2000
        and cfg.pretrained_path is None
        and cfg.resume is False
    )


def test_pyproject_writes_the_library_defaults_exactly() -> None:
    """One source: pyproject's run config is FederationConfig's defaults, value and type, and those are the
    library's own dataclass defaults where the library owns the value."""
    from shared.distill import DECODE_MODE, DistillConfig
    from shared.evaluation import MLPTrainConfig
    from shared.pretrain import PretrainConfig

    defaults = FederationConfig().to_run_config()
    drift = {k: (v, defaults[k]) for k, v in _app_config().items() if (v, type(v)) != (defaults[k], type(defaults[k]))}
    assert drift == {}, f"pyproject value vs FederationConfig default: {drift}"
    cfg, pre, mlp = FederationConfig(), PretrainConfig(), MLPTrainConfig()
    assert (cfg.vae_batch_size, cfg.scdg_batch_size) == (pre.vae.batch_size, pre.scdg.batch_size)
    assert (cfg.mlp_epochs, cfg.mlp_min_steps, cfg.mlp_max_steps) == (mlp.epochs, mlp.min_steps, mlp.max_steps)
    assert cfg.mlp == mlp and cfg.decode_mode is None and cfg.resolved_decode_mode == DECODE_MODE
    library = DistillConfig()
    assert (library.iterations, library.t_star) == (cfg.distill_iterations, cfg.distill_t_star) == (None, None)
    assert cfg.distill_guidance is None and distill_config(cfg).guidance == library.guidance == 2.0


def test_distill_keys_reach_the_sites_distill_config() -> None:
    read = FederationConfig.from_run_config
    dcfg = distill_config(read({"distill-guidance": 0.0, "distill-t-star": 250, "cells-per-class": 3}))
    assert (dcfg.guidance, dcfg.t_star, dcfg.k) == (0.0, 250, 3)
    assert distill_config(read({"distill-guidance": "auto"})).guidance == 2.0


def test_decode_mode_auto_draws_gaussian_cells_only_under_dp_statistics_pretraining() -> None:
    read = FederationConfig.from_run_config
    assert read({}).resolved_decode_mode == "expected"
    assert read({"decode-mode": "auto", "dp-epsilon": 8.0}).resolved_decode_mode == "gaussian"
    assert read({"dp-epsilon": 8.0, "dp-pretraining": "dp-sgd"}).resolved_decode_mode == "expected"
    assert read({"dp-epsilon": 8.0, "pretrained-path": "/models"}).resolved_decode_mode == "expected"
    assert read({"dp-epsilon": 8.0, "decode-mode": "expected"}).resolved_decode_mode == "expected"  # a set mode wins
    assert read({"decode-mode": "gaussian"}).resolved_decode_mode == "gaussian"
    assert read({"decode-mode": "auto"}).to_run_config()["decode-mode"] == "auto"


def test_library_statistics_are_released_only_where_a_count_head_reads_them() -> None:
    read = FederationConfig.from_run_config
    assert not read({"dp-epsilon": 8.0}).dp_spec("k").library_stats  # statistics pretraining: no count head
    assert read({"dp-epsilon": 8.0, "dp-pretraining": "dp-sgd"}).dp_spec("k").library_stats
    assert read({"dp-epsilon": 8.0, "pretrained-path": "/models"}).dp_spec("k").library_stats


def test_auto_and_empty_read_as_none_and_write_back() -> None:
    cfg = FederationConfig.from_run_config({"latent-dim": "auto", "distill-init": "auto", "out-dir": ""})
    assert cfg.latent_dim is None and cfg.distill_init is None and cfg.out_dir is None
    assert FederationConfig.from_run_config({"latent-dim": 16}).latent_dim == 16
    assert FederationConfig.from_run_config(cfg.to_run_config()) == cfg
    with pytest.raises(ConfigError, match='must be a int or "auto"'):
        FederationConfig.from_run_config({"latent-dim": ""})


def test_kebab_case_maps_and_ints_pass_as_floats() -> None:
    cfg = FederationConfig.from_run_config({"cells-per-class": 3, "round-timeout-s": 5, "resume": True})
    assert cfg.cells_per_class == 3 and cfg.round_timeout_s == 5.0 and cfg.resume is True


@pytest.mark.parametrize(
    ("run_config", "match"),
    [
        ({"no-such-key": 1}, "unknown run-config keys"),
        ({"cells_per_class": 3}, "unknown run-config keys"),
        ({"min-sites": 0}, "min-sites"),
        ({"cells-per-class": "10"}, "must be a int"),
        ({"resume": 1}, "must be a bool"),
        ({"test-fraction": 1.0}, "test-fraction"),
        ({"val-fraction": 0.85}, "val-fraction"),  # with the default test-fraction 0.2 no training cells would be left
        ({"mlp-epochs": -1.0}, "mlp-epochs"),
        ({"mlp-epochs": 0.0}, "mlp-epochs"),
        ({"expect": "raw"}, "expect"),
        ({"num-pretrain-rounds": 0}, "pretrained-path"),
        ({"round-timeout-s": 0}, "round-timeout-s"),
        ({"latent-dim": 1}, "latent-dim must be auto"),
        ({"distill-init": "zeros"}, "distill-init must be one of real, noise, kmeans"),
        ({"distill-guidance": -0.5}, "distill-guidance must be within 0..10"),
        ({"distill-guidance": 11.0}, "distill-guidance must be within 0..10"),
        ({"pretrain-lr": -1.0}, "pretrain-lr must be > 0"),
        ({"vae-batch-size": 0}, "vae-batch-size"),
        ({"server-optimizer": "sgd"}, "server-optimizer must be"),
        ({"server-lr": 0.0}, "server-lr must be > 0"),
        ({"proximal-mu": -0.1}, "proximal-mu must be >= 0"),
        ({"init-path": "/a", "pretrained-path": "/b"}, "not both"),
        ({"samples-per-code": 0}, "samples-per-code"),
        ({"decode-mode": "poisson"}, "decode-mode"),
        ({"site-optimizer-state": "warm"}, "site-optimizer-state must be one of reset, keep"),
        ({"local-lr-decay": "linear"}, "local-lr-decay must be one of none, cosine"),
        ({"balanced-class-heads": True, "dp-epsilon": 8.0}, "balanced-class-heads reads the site's exact class"),
        ({"site-covariate": "batch"}, "site-covariate must be one of off, own, neutral"),
        ({"site-covariate": "own", "dp-epsilon": 8.0}, "site-covariate trains a site vector"),
        ({"site-covariate": "neutral", "pretrained-path": "/m"}, "site-covariate trains a site vector"),
        ({"site-covariate": "own", "init-path": "/ref"}, "site-covariate trains a site vector"),
        ({"drift-control": "scaffold", "dp-epsilon": 8.0}, "drift-control=scaffold sends each site's gradient"),
        ({"drift-control": "fedbn"}, "drift-control must be one of none, scaffold"),
    ],
)
def test_bad_run_config_is_refused_with_a_named_reason(run_config: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FederationConfig.from_run_config(run_config)


def test_run_dir_is_out_dir_slash_run_id(tmp_path: Path) -> None:
    cfg = FederationConfig.from_run_config({"out-dir": str(tmp_path), "run-id": "r7"})
    assert cfg.run_dir("ignored") == tmp_path / "r7"
    assert FederationConfig.from_run_config({"out-dir": str(tmp_path)}).run_dir("run-5") == tmp_path / "run-5"
    assert cfg.spec.split_seed == cfg.seed and cfg.spec.label_key == "cell_type"


def test_without_out_dir_runs_go_to_the_coordinators_out_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSCDD_OUT_DIR", str(tmp_path / "state" / "runs"))
    assert FederationConfig.from_run_config({}).run_dir("run-9") == tmp_path / "state" / "runs" / "run-9"
    # an explicit out-dir wins over the coordinator's default
    assert (
        FederationConfig.from_run_config({"out-dir": str(tmp_path / "mine")}).run_dir("run-9")
        == tmp_path / "mine" / "run-9"
    )
    monkeypatch.delenv("FEDSCDD_OUT_DIR")
    monkeypatch.chdir(tmp_path)
    assert FederationConfig.from_run_config({}).run_dir("run-9") == tmp_path / "scdd-out" / "run-9"
