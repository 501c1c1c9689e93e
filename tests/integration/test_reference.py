"""`scdd pretrain` on real data, then a federation that uses it: pretrained-path (no FedAvg) and init-path (FedAvg from
it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from server.cli import main
from server.cli.simulation import InProcessGrid, run_in_process
from server.reference import init_models, load_reference, transfer
from shared.checkpoint import load_model, model_hash
from shared.errors import ConfigError
from shared.models import SCDG, VAE, SCDGConfig, VAEConfig
from shared.protocol import MSG_PRETRAIN, PretrainRequest

RUN = {
    "sim-site-key": "batch",
    "label-key": "cell_type",
    "cells-per-class": 3,
    "num-distill-rounds": 1,
    "distill-iterations": 5,
    "finetune-steps": 0,
    "mlp-min-steps": 100,
    "mlp-max-steps": 100,
    "report": False,
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, example_path: Path) -> Path:
    """A reference pretrained by the CLI on the bundled (real) kang file."""
    out = tmp_path_factory.mktemp("ref") / "kang-ref"
    assert (
        main(
            [
                "pretrain",
                str(example_path),
                "--label-key",
                "cell_type",
                "--pretrain-steps",
                "300,200",
                "--n-genes",
                "250",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_pretrain_writes_what_pretrained_path_reads(reference: Path) -> None:
    for name in ("plan.json", "vae.pt", "scdg.pt", "reference.json"):
        assert (reference / name).is_file(), name
    plan, vae, scdg = load_reference(reference)
    assert len(plan.genes) == 250 and plan.classes == tuple(sorted(plan.classes)) and len(plan.classes) == 5
    assert vae.config.n_genes == 250 and scdg.config.n_classes == 5
    info = json.loads((reference / "reference.json").read_text())
    assert info["n_cells"] == 1556 and info["vae_steps"] == 300


def test_pretrain_refuses_a_missing_label_column_in_one_line(
    example_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pretrain", str(example_path), "--label-key", "nope", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("scdd pretrain: error:") and "nope" in err and len(err.splitlines()) == 1


def _federate(example_path: Path, tmp_path: Path, run_id: str, extra: dict[str, object]) -> tuple[InProcessGrid, Path]:
    """A recorded in-process federation of the kang file's 4 batches (RUN plus ``extra``); its grid and run folder."""
    cfg = {**RUN, "sim-data-path": str(example_path), "out-dir": str(tmp_path), "run-id": run_id, **extra}
    grid = run_in_process(cfg, num_nodes=4, node_configs=[{"cache-dir": str(tmp_path / "cache")}] * 4, record=True)
    return grid, tmp_path / run_id


@pytest.mark.slow
def test_a_federation_from_pretrained_path_uses_the_stored_models_and_trains_none(
    reference: Path, example_path: Path, tmp_path: Path
) -> None:
    grid, run = _federate(example_path, tmp_path, "fixed", {"pretrained-path": str(reference)})
    assert not [e for e in grid.log if e.message_type == MSG_PRETRAIN]  # no weights left the sites
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["pretrain"]["source"] == "checkpoint"
    assert json.loads((run / "plan.json").read_text())["genes"] == list(load_reference(reference)[0].genes)
    assert model_hash(load_model(run / "vae.pt")) == model_hash(load_model(reference / "vae.pt"))
    agg = metrics["rounds"][0]["aggregate"]["cell_weighted"]["mlp"]["accuracy"]
    assert agg > 0.6  # 5 classes: chance 0.2; the reference was trained on these very cells


def _first_vae_request(grid: InProcessGrid) -> PretrainRequest:
    first = next(e for e in grid.log if e.message_type == MSG_PRETRAIN)
    req = PretrainRequest.from_record(first.instruction.content)
    assert req.stage == "vae" and req.round == 1
    return req


@pytest.mark.slow
def test_init_path_starts_fedavg_from_the_reference_on_its_genes(
    reference: Path, example_path: Path, tmp_path: Path
) -> None:
    from_reference = {
        "init-path": str(reference),
        "n-genes": 120,
        "num-pretrain-rounds": 2,
        "vae-local-steps": 20,
        "scdg-local-steps": 10,
    }
    grid, run = _federate(example_path, tmp_path, "init", from_reference)
    ref_plan, ref_vae, _ = load_reference(reference)
    genes = json.loads((run / "plan.json").read_text())["genes"]
    assert len(genes) == 120 and set(genes) <= set(ref_plan.genes)
    sent = _first_vae_request(grid).weights  # the weights FedAvg started from
    cols = [ref_plan.genes.index(g) for g in genes]
    np.testing.assert_array_equal(sent["encoder.0.weight"], ref_vae.state_dict()["encoder.0.weight"].numpy()[:, cols])
    np.testing.assert_array_equal(sent["to_mean.weight"], ref_vae.state_dict()["to_mean.weight"].numpy()[cols])
    np.testing.assert_array_equal(sent["decoder.0.weight"], ref_vae.state_dict()["decoder.0.weight"].numpy())
    init = json.loads((run / "metrics.json").read_text())["pretrain"]["init"]
    assert init["plan_genes"] == 120 and init["vae_tensors"] > 10 and init["latent_dim"] == ref_vae.config.latent_dim


def test_transfer_reindexes_genes_and_leaves_class_rows_fresh() -> None:
    torch.manual_seed(0)
    src_genes = [f"g{i}" for i in range(12)]
    dst_genes = ["g7", "g2", "g11"]
    src = VAE(VAEConfig(n_genes=12, latent_dim=4, n_classes=6))
    dst = VAE(VAEConfig(n_genes=3, latent_dim=4, n_classes=2))
    fresh_head = dst.label_head.weight.detach().clone()  # type: ignore[union-attr]
    transfer(src, dst, src_genes=src_genes, dst_genes=dst_genes)
    torch.testing.assert_close(dst.encoder[0].weight, src.encoder[0].weight[:, [7, 2, 11]])
    torch.testing.assert_close(dst.to_logit.bias, src.to_logit.bias[[7, 2, 11]])
    torch.testing.assert_close(dst.label_head.weight, fresh_head)  # type: ignore[union-attr]
    s_src, s_dst = SCDG(SCDGConfig(latent_dim=4, n_classes=6)), SCDG(SCDGConfig(latent_dim=4, n_classes=2))
    fresh_qa = s_dst.qa[2].weight.detach().clone()
    transfer(s_src, s_dst)
    torch.testing.assert_close(s_dst.class_emb.weight[-1], s_src.class_emb.weight[-1])  # the null class transfers
    torch.testing.assert_close(s_dst.qa[2].weight, fresh_qa)
    torch.testing.assert_close(s_dst.inp.weight, s_src.inp.weight)
    with pytest.raises(ConfigError, match="not in the reference"):
        transfer(src, VAE(VAEConfig(n_genes=1, latent_dim=4, n_classes=2)), src_genes=src_genes, dst_genes=["absent"])


def test_init_models_refuses_a_folder_without_a_reference(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scdd pretrain"):
        init_models(tmp_path, ["g1"], 2, seed=0)
