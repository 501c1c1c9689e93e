"""site-covariate: each site trains and receives its own VAE site vector; the server decodes its codes with it."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from server.cli.simulation import run_in_process
from server.config import SITE_DIM
from server.run_store import RunStore
from shared.checkpoint import load_model
from shared.distill import generate
from shared.models.vae import SITE_KEY
from shared.protocol import MSG_DISTILL, MSG_PRETRAIN, DistillRequest, PretrainReply, PretrainRequest


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["own", "neutral"])
def test_each_site_keeps_its_vector_and_its_codes_decode_with_it(
    decode: str, tiny_config: dict, site_cache: dict[str, str]
) -> None:
    cfg = {**tiny_config, "num-pretrain-rounds": 3, "num-distill-rounds": 1, "finetune-steps": 0}
    grid = run_in_process({**cfg, "site-covariate": decode}, num_nodes=3, node_configs=[site_cache] * 3, record=True)
    vae_rounds: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}  # round -> node -> (sent, returned)
    encoders: dict[int, list[np.ndarray]] = {}
    for ex in grid.log:
        if ex.message_type != MSG_PRETRAIN or ex.reply is None:
            continue
        req = PretrainRequest.from_record(ex.instruction.content)
        if req.stage == "vae":
            rep = PretrainReply.from_record(ex.reply.content)
            assert rep.weights is not None
            vae_rounds.setdefault(req.round, {})[ex.node_id] = (req.weights[SITE_KEY], rep.weights[SITE_KEY])
        elif req.stage == "scdg":
            assert req.encoder is not None
            encoders.setdefault(ex.node_id, []).append(req.encoder[SITE_KEY])
    nodes = sorted(vae_rounds[1])
    assert len(nodes) == 3 and all(v[0].shape == (SITE_DIM,) for v in vae_rounds[1].values())
    first = [vae_rounds[1][n][0] for n in nodes]
    assert all(not np.allclose(a, b) for i, a in enumerate(first) for b in first[i + 1 :])  # distinct from the start
    for rnd in (2, 3):  # a site gets back exactly the vector it trained, not the average
        for n in nodes:
            np.testing.assert_array_equal(vae_rounds[rnd][n][0], vae_rounds[rnd - 1][n][1])
            assert not np.allclose(vae_rounds[rnd][n][0], vae_rounds[rnd][nodes[0] if n != nodes[0] else nodes[1]][0])
    final = {n: vae_rounds[3][n][1] for n in nodes}
    for n, sent in encoders.items():  # the SCDG learns on latents each site encodes with its own vector
        assert all(np.array_equal(v, final[n]) for v in sent)
    distilled = [
        DistillRequest.from_record(ex.instruction.content) for ex in grid.log if ex.message_type == MSG_DISTILL
    ]
    sent_distill = sorted(tuple(r.vae[SITE_KEY]) for r in distilled)
    assert sent_distill == sorted(tuple(v) for v in final.values())

    run_dir = Path(str(cfg["out-dir"])) / "tiny"
    state = RunStore(run_dir).load_checkpoint()
    assert state is not None and sorted(tuple(v) for v in state.site_vectors.values()) == sent_distill
    vae, scdg = load_model(run_dir / "vae.pt", "vae"), load_model(run_dir / "scdg.pt", "scdg")
    average = vae.site_embedding.detach().numpy().copy()  # type: ignore[union-attr]
    assert not any(np.allclose(average, v) for v in final.values())  # FedAvg's average of the sites' vectors
    fused = ad.read_h5ad(run_dir / "synthetic.h5ad")
    for site, codes in state.codes.items():
        rows = (fused.obs["site"] == site).to_numpy()
        shipped = fused[rows].layers["expected"].toarray()
        with vae.as_site(state.site_vectors[site]) as own:  # type: ignore[attr-defined]
            by_own = generate(own, scdg, codes, mode="expected")
        by_average = generate(vae, scdg, codes, mode="expected")  # type: ignore[arg-type]
        np.testing.assert_allclose(shipped, by_own if decode == "own" else by_average, rtol=1e-5, atol=1e-6)
        assert not np.allclose(by_own, by_average, atol=1e-4)
        np.testing.assert_array_equal(vae.site_embedding.detach().numpy(), average)  # type: ignore[union-attr]
