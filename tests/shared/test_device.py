"""The `device` option: cpu by default, auto takes a GPU when torch sees one, and a GPU that is not there is refused in
one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.cli import main
from server.config import FederationConfig
from shared.device import check_device, resolve_device
from shared.errors import ConfigError


def _gpus(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_auto_is_the_gpu_when_there_is_one_and_the_cpu_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    _gpus(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")  # cpu stays cpu on a GPU machine


def test_a_gpu_that_is_not_there_or_a_bad_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 0)
    with pytest.raises(ConfigError, match=r"torch sees none.*device='auto'"):
        resolve_device("cuda")
    _gpus(monkeypatch, 1)
    with pytest.raises(ConfigError, match=r"sees 1 GPU\(s\)"):
        resolve_device("cuda:1")
    for bad in ("gpu", "CUDA", "cuda:x", ""):
        with pytest.raises(ConfigError, match="unknown device"):
            check_device(bad)


def test_the_run_config_checks_the_device_and_keeps_dp_on_cpu() -> None:
    assert FederationConfig().device == "cpu" and FederationConfig.from_run_config({"device": "auto"}).device == "auto"
    with pytest.raises(ConfigError, match="device must be"):
        FederationConfig(device="tpu")
    with pytest.raises(ConfigError, match="device must be 'cpu' when dp-epsilon"):
        FederationConfig(device="auto", dp_epsilon=8.0)


def test_simulate_refuses_a_missing_gpu_before_it_starts(
    example_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _gpus(monkeypatch, 0)
    assert main(["simulate", str(example_path), "--device", "cuda", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "torch sees none" in err and "Traceback" not in err and not (tmp_path / "run").exists()


def test_a_dp_site_refuses_a_gpu_before_touching_its_cells(three_site_h5ad: Path, tmp_path: Path) -> None:
    from client import tasks
    from client.privacy import SiteDP
    from client.site import load_site, resolve_source
    from server.synthesis import fresh_models
    from shared.checkpoint import model_json, state_of
    from shared.privacy.mechanisms import site_secret
    from shared.privacy.spec import DPSpec
    from shared.protocol import Plan, PretrainRequest, SiteSpec

    dp_spec = DPSpec(50.0, None, 1.0, "run", rounds=1, vae_steps=2, vae_batch=8, scdg_steps=2, scdg_batch=8)
    spec = SiteSpec(label_key="cell_type", dp=dp_spec)
    site = load_site(
        resolve_source({"partition-id": 0}, {"sim-data-path": str(three_site_h5ad), "sim-site-key": "site"}),
        spec,
        None,
        cache=tmp_path,
    )
    plan = Plan(site.genes, site.classes, spec)
    vae, _ = fresh_models(plan, latent_dim=4, seed=0)
    req = PretrainRequest("vae", 1, state_of(vae), model_json(vae), plan, 2, 1e-3, 8, (0.0, 1.0), 0)
    with pytest.raises(ConfigError, match="DP runs on CPU"):
        tasks.pretrain_site(site, req, SiteDP(dp_spec, site_secret(tmp_path), tmp_path, "site"), torch.device("cuda"))


FIDELITY_THEN_THREADS = """
import numpy as np, torch
torch.set_num_threads(1)
import sklearn  # a site process has scikit-learn's OpenMP runtime loaded before its first fidelity score
from shared.evaluation import marker_genes
assert torch.get_num_threads() == 1  # read once before: only then does the reset show (measured)
rng = np.random.default_rng(0)
X = np.log1p(rng.poisson(1.0, (120, 80)).astype(np.float32))
marker_genes(X, np.repeat([0, 1, 2], 40), np.array([0, 1, 2]))
print(torch.get_num_threads())
"""


@pytest.mark.slow  # over 5 s: outside the fast tier
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the reset is to all cores: invisible on one")
def test_scanpy_marker_genes_leave_torch_on_the_threads_the_site_set() -> None:
    # A fresh process: numba's OpenMP pool starts once per process, on scanpy's first wilcoxon.
    out = subprocess.run(
        [sys.executable, "-c", FIDELITY_THEN_THREADS],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == "1"
