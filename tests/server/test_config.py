"""FederationConfig: empty config works, pyproject keys map 1:1, unknown keys and bad values are refused."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from server.config import FederationConfig
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
        and cfg.latent_dim == 0
        and cfg.n_genes == 2000
        and cfg.pretrained_path == ""
        and cfg.resume is False
    )


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
        ({"expect": "raw"}, "expect"),
        ({"num-pretrain-rounds": 0}, "pretrained-path"),
        ({"round-timeout-s": 0}, "round-timeout-s"),
        ({"latent-dim": 1}, "latent-dim must be 0"),
        ({"server-optimizer": "sgd"}, "server-optimizer must be"),
        ({"server-lr": 0.0}, "server-lr must be > 0"),
        ({"proximal-mu": -0.1}, "proximal-mu must be >= 0"),
        ({"init-path": "/a", "pretrained-path": "/b"}, "not both"),
        ({"samples-per-code": 0}, "samples-per-code"),
        ({"decode-mode": "poisson"}, "decode-mode"),
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
