"""Bad site files reach the ClientApp the way they would in a hospital: named by the SuperNode's
node config (the cases are bad_sites.BAD_INPUTS, which tests/shared/test_bad_input.py hands to the data layer).
Each is refused with one line naming the problem and the fix, and nothing planted in
the file (cell ids, an expression value) reaches the error text, which Flower forwards to the coordinator."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
from bad_sites import BAD_INPUT_NAMES, BAD_INPUTS, N_CELLS, assert_clear_and_clean, site, write_site
from flwr.app import Context, Message, RecordDict

from client.app import app
from server.synthesis import fresh_models
from shared.checkpoint import model_json, state_of
from shared.errors import SiteDataError
from shared.protocol import Plan, PretrainRequest, ProfileRequest, SiteSpec


def _ctx(path: Path, tmp: Path) -> Context:
    node = {"data-path": str(path), "site-name": "hospital-a", "cache-dir": str(tmp / "cache")}
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={"torch-threads": 1})


def _profile_query(spec: SiteSpec) -> Message:
    return Message(ProfileRequest(spec).to_record(), dst_node_id=7, message_type="query.profile")


def test_at_least_fifteen_kinds_of_bad_site_file() -> None:
    assert len(BAD_INPUTS) >= 15


@pytest.mark.parametrize("name", BAD_INPUT_NAMES)
def test_clientapp_refuses_a_bad_site_file_in_one_clean_line(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    case = BAD_INPUTS[name]
    caplog.set_level(logging.DEBUG)
    spec = SiteSpec(label_key=case.label_key, expect=case.expect)  # what the coordinator asks for
    with pytest.raises(SiteDataError) as info:
        app(_profile_query(spec), _ctx(case.write(tmp_path), tmp_path))
    assert_clear_and_clean(info.value, case.problem, case.fix, caplog.text)


def test_clientapp_refuses_a_plan_whose_genes_the_site_does_not_have(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = write_site(site(), tmp_path)
    plan = Plan(tuple(f"ENSG{j:05d}" for j in range(20)), ("type_0", "type_1", "type_2"), SiteSpec())
    vae, _ = fresh_models(plan, latent_dim=4, seed=0)
    req = PretrainRequest("vae", 1, state_of(vae), model_json(vae), plan, 2, 1e-3, 8, (1.0, 1.0), 0)
    with pytest.raises(SiteDataError) as info:
        app(Message(req.to_record(), dst_node_id=7, message_type="train.pretrain"), _ctx(path, tmp_path))
    assert_clear_and_clean(info.value, "no overlap", "symbols vs Ensembl", caplog.text)


@pytest.mark.filterwarnings("ignore:only one class")
def test_a_single_class_site_is_valid_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    path = write_site(site(labels=pd.Categorical(["sorted_B"] * N_CELLS)), tmp_path)
    reply = app(_profile_query(SiteSpec()), _ctx(path, tmp_path))
    assert reply.has_content() and not reply.has_error()
    assert "only one class ('sorted_B')" in caplog.text and "sorted population is fine" in caplog.text, caplog.text
