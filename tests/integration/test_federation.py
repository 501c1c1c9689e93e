"""The whole ServerApp + ClientApp flow through the in-process Grid (no Ray).

One run on the REAL bundled kang data (4 sites) checks outputs, accuracy and privacy; seconds-long
runs on a synthetic 3-site file check dropped sites, stop reasons and resume.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Context, Message, RecordDict

from server.cli.simulation import InProcessGrid, component_ref, load_component, run_in_process
from server.errors import TOO_FEW_SITES, FederationStopped
from server.run_store import RunStore
from server.validation import distill_budget
from shared.audit import AUDIT_KEYS
from shared.checkpoint import load_model, model_hash
from shared.pretrain import latent_dim_for
from shared.protocol import (
    MSG_DISTILL,
    MSG_EVALUATE,
    MSG_PRETRAIN,
    MSG_PROFILE,
    DistillReply,
    DistillRequest,
    ProfileReply,
)
from shared.protocol.codec import KEY_CODES, KEY_CONFIG, KEY_METRICS, KEY_STATS, KEY_WEIGHTS

KANG = {
    "sim-site-key": "batch",
    "label-key": "cell_type",
    "n-genes": 300,
    "num-pretrain-rounds": 2,
    "vae-local-steps": 150,
    "scdg-local-steps": 30,
    "scdg-batch-size": 64,
    "pretrain-lr": 0.002,
    "cells-per-class": 10,
    "num-distill-rounds": 2,
    "distill-iterations": 10,
    "finetune-steps": 10,
    "mlp-min-steps": 150,
    "mlp-max-steps": 150,
    "report": False,
    "run-id": "kang",
}
K, CHANCE = 10, 0.2


@pytest.fixture(scope="module")
def kang(tmp_path_factory: pytest.TempPathFactory, example_path: Path) -> tuple[InProcessGrid, Path, list[str]]:
    """One federated run on the bundled real data; returns (grid with every exchange, run dir, captured log lines)."""
    out = tmp_path_factory.mktemp("kang")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: records.append(rec.getMessage())  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    try:
        cfg = {**KANG, "sim-data-path": str(example_path), "out-dir": str(out)}
        grid = run_in_process(cfg, num_nodes=4, node_configs=[{"cache-dir": str(out / "cache")}] * 4, record=True)
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
    return grid, out / "kang", records


def test_kang_run_writes_every_output(kang: tuple[InProcessGrid, Path, list[str]]) -> None:
    _, run_dir, _ = kang
    for name in (
        "config.json",
        "plan.json",
        "metrics.json",
        "synthetic.h5ad",
        "synthetic_round1.h5ad",
        "synthetic_round2.h5ad",
        "vae.pt",
        "scdg.pt",
        "mlp.pt",
        "state/state.json",
        "pretrained/plan.json",
        "pretrained/vae.pt",
        "pretrained/scdg.pt",
    ):
        assert (run_dir / name).is_file(), name
    # pretrained/ holds the models as FedAvg left them (a pretrained-path folder): the VAE is never fine-tuned, the
    # SCDG is
    assert model_hash(load_model(run_dir / "pretrained" / "vae.pt")) == model_hash(load_model(run_dir / "vae.pt"))
    assert model_hash(load_model(run_dir / "pretrained" / "scdg.pt")) != model_hash(load_model(run_dir / "scdg.pt"))
    synth = ad.read_h5ad(run_dir / "synthetic.h5ad")
    assert {"cell_type", "site", "round"} <= set(synth.obs) and set(synth.obs["round"]) == {2}
    assert sorted(synth.obs["site"].unique()) == ["ctrl101", "ctrl107", "stim101", "stim107"]
    assert synth.n_obs == 4 * 5 * K and synth.n_vars == 300
    assert "provenance_json" in synth.uns["fedscdd"]
    # kang holds raw counts at every site: sampled counts and the decoder's expected expression travel with X
    assert (
        set(synth.layers) == {"counts", "expected"}
        and json.loads((run_dir / "metrics.json").read_text())["count_input"] is True
    )
    counts = synth.layers["counts"].toarray()
    assert (counts >= 0).all() and np.array_equal(counts, np.round(counts)) and 0.3 < (counts == 0).mean() < 0.98
    vae = load_model(run_dir / "vae.pt", "vae")
    assert vae.count_head is not None
    assert (
        vae.config.latent_dim == latent_dim_for(300) == 14
    )  # latent-dim left at 0 (auto): a code is <= 1/20 of a 300-gene cell
    config = json.loads((run_dir / "config.json").read_text())
    assert {"flwr", "torch", "anndata", "scanpy", "numpy"} <= set(config["versions"])


def test_kang_accuracy_is_well_above_chance_and_round_2_holds(kang: tuple[InProcessGrid, Path, list[str]]) -> None:
    metrics = json.loads((kang[1] / "metrics.json").read_text())
    acc = [r["aggregate"]["cell_weighted"]["mlp"]["accuracy"] for r in metrics["rounds"]]
    assert len(acc) == 2 and min(acc) > 3 * CHANCE, acc  # measured 0.81 / 0.83
    assert acc[1] >= acc[0] - 0.06, acc  # round-to-round noise on kang is about +-0.04 (different code draws)
    assert set(metrics["rounds"][0]["sites"]) == {"ctrl101", "ctrl107", "stim101", "stim107"}
    assert not metrics["dropped"]


def test_decoded_cells_of_each_site_and_class_average_to_the_class_mean_it_sent(
    kang: tuple[InProcessGrid, Path, list[str]],
) -> None:
    """recenter (default true): a site's synthetic cells of a class are shifted onto the training-cell mean the site
    sent with its codes; layers["expected"] keeps the decoder's own expression, which is farther from it."""
    grid, run_dir, _ = kang
    sent = {}
    for ex in grid.log:
        if ex.message_type == MSG_DISTILL and ex.reply is not None:
            reply = DistillReply.from_record(ex.reply.content)
            if reply.round == 2:
                sent[ex.node_id] = reply.class_means
    synth = ad.read_h5ad(run_dir / "synthetic.h5ad")
    assert json.loads(synth.uns["fedscdd"]["provenance_json"])["decode"] == "expected"
    X, expected = synth.X.toarray(), synth.layers["expected"].toarray()
    sites, labels = synth.obs["site"].to_numpy(), synth.obs["cell_type"].cat.codes.to_numpy()
    names = {
        e.node_id: ProfileReply.from_record(e.reply.content).site_name
        for e in grid.log
        if e.message_type == MSG_PROFILE and e.reply is not None
    }
    gaps = []
    for node, means in sent.items():
        assert means is not None
        for c in np.unique(labels[sites == names[node]]):
            rows = (sites == names[node]) & (labels == c)
            assert np.isfinite(means[c]).all()  # every kang class has >= 5 training cells at every site
            gaps.append((np.abs(X[rows].mean(0) - means[c]).mean(), np.abs(expected[rows].mean(0) - means[c]).mean()))
    assert len(gaps) == 4 * 5 and all(x < 0.02 and x < 0.5 * e for x, e in gaps), gaps


def test_sites_report_validation_scores_and_the_privacy_audit(kang: tuple[InProcessGrid, Path, list[str]]) -> None:
    """Every round's per-site entry and its aggregate carry validation scores and the four-part audit with its chance
    bounds (seeds kept at the site)."""
    metrics = json.loads((kang[1] / "metrics.json").read_text())
    for rnd in metrics["rounds"]:
        for site, entry in rnd["sites"].items():
            audit = entry["audit"]
            assert set(audit) == set(AUDIT_KEYS), site
            assert all(0.5 < audit[f"{k}_null95"] < 1 for k in ("seed_mia", "population_mia", "density_mia")), (
                site,
                audit,
            )  # the chance bound of each AUC at this site's sizes
            assert all(0 <= v <= 1 for v in audit.values()), (
                site,
                audit,
            )  # finite: the site found the cells that seeded its codes
            assert entry["validation"]["n_val"] > 0 and 0 <= entry["validation"]["scores"]["mlp"]["accuracy"] <= 1
            assert 0 <= entry["fidelity"]["marker_overlap"] <= 1
        agg = rnd["aggregate"]
        assert agg["audit"]["seed_mia_max"] == max(e["audit"]["seed_mia"] for e in rnd["sites"].values())
        assert 0 < agg["validation"]["cell_weighted"]["mlp"]["accuracy"] <= 1 and agg["n_val"] > 0
    # the 4 sites share one cache folder here: each kept its own seed rows (one file per site, 5 classes x k codes)
    files = sorted((kang[1].parent / "cache").glob("members-run1-*.npy"))
    assert len(files) == 4 and all(len(np.load(f)) == 5 * K for f in files)


def test_each_site_reports_what_it_gains_by_joining(kang: tuple[InProcessGrid, Path, list[str]]) -> None:
    """Local-only scores (a model on the site's own training cells) beside the federated ones: metrics.json, the log,
    report.html."""
    from server import report

    _, run_dir, log = kang
    metrics = json.loads((run_dir / "metrics.json").read_text())
    first, second = (r["sites"] for r in metrics["rounds"])
    for site, entry in first.items():
        local = entry["local_only"]
        assert set(local) == {"mlp", "logreg"} and all(0.5 < local[ev]["accuracy"] <= 1 for ev in local), (
            site,
            local,
        )  # 5 classes
        assert (
            second[site]["local_only"] == local
        )  # it depends on the site's cells only: computed once, kept in the site's cache
        assert any(f"site {site}: MLP accuracy" in line and "fine-tuned" in line for line in log), site
        tuned = entry["fine_tuned"]["mlp"]  # the shared MLP trained further on the site's cells: recomputed each round
        assert 0.5 < tuned["accuracy"] <= 1 and 0 < tuned["macro_f1"] <= 1, (site, tuned)
    agg = metrics["rounds"][0]["aggregate"]["local_only"]
    assert 0.5 < agg["cell_weighted"]["mlp"]["accuracy"] <= 1 and 0.5 < agg["macro"]["logreg"]["accuracy"] <= 1
    assert 0.5 < metrics["rounds"][0]["aggregate"]["fine_tuned"]["macro"]["mlp"]["accuracy"] <= 1
    assert len(list((run_dir.parent / "cache").glob("local-only-*.json"))) == 4
    rows = report._site_table(metrics["rounds"][-1], {})
    assert "gain from joining" in rows and "MLP acc local-only" in rows and "gain, fine-tuned" in rows


def test_report_is_self_contained_html(
    kang: tuple[InProcessGrid, Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Report structure from the kang run; the embedding is stubbed (tests/server/test_report.py runs it)."""
    from server import report

    monkeypatch.setattr(report, "_embedding", lambda a: (np.random.default_rng(0).normal(size=(a.n_obs, 2)), "t-SNE"))
    html = report.write_report(kang[1]).read_text()
    assert (
        html.count("data:image/png;base64,") == 4
        and 'src="http' not in html
        and "What each site gains by joining" in html
    )
    assert "Fidelity: do the synthetic cells look like real ones?" in html
    assert report.AUDIT_GUIDE in html and "stim107" in html and "sc.tl.tsne" in html and "seed MIA" in html


def _all_strings(content: RecordDict) -> list[str]:
    """Every string a reply carries: config values and keys, record names, decoded byte arrays."""
    out = list(content.keys())
    for rec in content.values():
        out += list(rec.keys())
        for v in rec.values():
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, list):
                out += [x for x in v if isinstance(x, str)]
            elif isinstance(v, Array) and v.numpy().dtype == np.uint8:
                out.append(v.numpy().tobytes().decode("utf-8", "replace"))
    return out


def test_privacy_nothing_cell_level_leaves_a_site(
    kang: tuple[InProcessGrid, Path, list[str]], example_path: Path
) -> None:
    grid, run_dir, logs = kang
    obs_names = set(ad.read_h5ad(example_path, backed="r").obs_names)
    plan = json.loads((run_dir / "plan.json").read_text())
    n_classes, n_genes, d = len(plan["classes"]), len(plan["genes"]), latent_dim_for(len(plan["genes"]))
    distill_bytes: dict[tuple[int, int], int] = {}
    assert len(grid.log) == 4 * (1 + 2 + 1 + 2 + 2 + 2)  # every node answered every message
    for ex in grid.log:
        reply = ex.reply
        assert reply is not None and reply.has_content(), ex.message_type
        content = reply.content
        text = "\n".join(_all_strings(content))
        assert not any(name in text for name in obs_names), ex.message_type
        if ex.message_type == MSG_PROFILE:
            assert set(content.keys()) == {KEY_CONFIG, KEY_STATS}
            assert all(a.numpy().ndim == 1 for a in content[KEY_STATS].values())  # per-gene / per-label vectors only
            assert content[KEY_STATS]["sums"].numpy().shape[0] > n_genes  # the site's own genes, aggregated over cells
        elif ex.message_type == MSG_DISTILL:
            assert set(content.keys()) == {KEY_CONFIG, KEY_CODES, KEY_METRICS}
            arrays = content[KEY_CODES]
            assert set(arrays.keys()) == {"codes", "labels", "class-counts", "library", "class-means"}  # recenter
            assert arrays["codes"].numpy().shape[1] == d and arrays["class-counts"].numpy().shape == (n_classes,)
            assert arrays["library"].numpy().shape == (n_classes, 3)  # per-class aggregates, never per cell
            assert arrays["class-means"].numpy().shape == (n_classes, n_genes)
            assert n_genes not in arrays["codes"].numpy().shape  # no expression rows
            rnd = int(content[KEY_CONFIG]["round"])
            distill_bytes[(ex.node_id, rnd)] = distill_bytes.get((ex.node_id, rnd), 0) + _wire(content)
        elif ex.message_type == MSG_PRETRAIN:
            assert set(content.keys()) <= {KEY_CONFIG, KEY_METRICS, KEY_WEIGHTS, "latent-stats"}
            sent = ex.instruction.content[KEY_WEIGHTS]
            if KEY_WEIGHTS in content:
                assert {k: a.shape for k, a in content[KEY_WEIGHTS].items()} == {k: a.shape for k, a in sent.items()}
        else:
            assert ex.message_type == MSG_EVALUATE and set(content.keys()) == {KEY_CONFIG, KEY_METRICS}
            assert all(not isinstance(v, list) or len(v) == n_classes for v in content[KEY_METRICS].values())
    assert len(distill_bytes) == 4 * 2
    assert max(distill_bytes.values()) <= distill_budget(K, n_classes, d, n_genes)
    assert not any(name in line for line in logs for name in list(obs_names)[:200])


def _wire(content: RecordDict) -> int:
    from shared.protocol import wire_bytes

    return wire_bytes(content)


# ----------------------------------------------------------------------------- faulty sites (synthetic data)
def _faulty(kind: str, corrupt: Callable[[RecordDict], None]) -> Callable[[Message, Context], Message]:
    """The real ClientApp, except that partition 0 corrupts its replies of message type ``kind``."""
    real = load_component(component_ref("clientapp"))

    def client(msg: Message, ctx: Context) -> Message:
        reply = real(msg, ctx)
        if ctx.node_config["partition-id"] == 0 and msg.metadata.message_type == kind:
            corrupt(reply.content)
        return reply

    return client


def _raise(_: RecordDict) -> None:
    raise RuntimeError("site crashed")


def _first_weight_wrong(rd: RecordDict) -> None:
    rd[KEY_WEIGHTS][next(iter(rd[KEY_WEIGHTS]))] = Array(np.zeros(1, np.float32))


# What partition 0 does to its n-th reply of each message type (None: nothing); the phase it is dropped from.
GAUNTLET: dict[str, list[tuple[str, Callable[[RecordDict], None]]]] = {
    MSG_PRETRAIN: [
        ("pretrain-vae-1", _first_weight_wrong),
        ("pretrain-latent-stats-0", lambda rd: rd.__setitem__("cells", ConfigRecord({"barcode": "AAAC-1"}))),
        ("pretrain-scdg-1", _raise),
    ],
    MSG_DISTILL: [
        ("distill-1", lambda rd: rd[KEY_CODES].__setitem__("codes", Array(np.full((6, 8), np.nan, np.float32)))),
        ("distill-2", lambda rd: rd[KEY_CODES].__setitem__("codes", Array(np.zeros((6, 4000), np.float32)))),
    ],
    MSG_EVALUATE: [
        ("evaluate-1", lambda rd: rd[KEY_CONFIG].__setitem__("schema-version", 0)),
        ("evaluate-2", lambda rd: rd[KEY_METRICS].__setitem__("cell-ids", [1.0, 2.0])),
    ],
}


def _gauntlet_client() -> Callable[[Message, Context], Message]:
    """The real ClientApp, except that partition 0 corrupts every reply after its profile, differently each time."""
    real = load_component(component_ref("clientapp"))
    calls: dict[str, int] = {}

    def client(msg: Message, ctx: Context) -> Message:
        reply = real(msg, ctx)
        kind = msg.metadata.message_type
        if ctx.node_config["partition-id"] == 0 and kind in GAUNTLET:
            n = calls[kind] = calls.get(kind, -1) + 1
            GAUNTLET[kind][n][1](reply.content)
        return reply

    return client


def test_a_site_misbehaving_in_every_exchange_is_dropped_each_time_and_the_run_completes(
    tiny_config: dict, site_cache: dict[str, str]
) -> None:
    run_in_process(tiny_config, num_nodes=3, node_configs=[site_cache] * 3, client_app=_gauntlet_client())
    run_dir = Path(str(tiny_config["out-dir"])) / "tiny"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["rounds"]) == 2 and (run_dir / "synthetic.h5ad").is_file()
    dropped = {d["phase"]: d["reason"] for d in metrics["dropped"] if d["site"] == "site_a"}
    assert sorted(dropped) == sorted(phase for steps in GAUNTLET.values() for phase, _ in steps), metrics["dropped"]
    assert (
        "error reply" in dropped["pretrain-scdg-1"]
        and "budget" in dropped["distill-2"]
        and "NaN" in dropped["distill-1"]
    )
    assert all(
        set(r["sites_distilled"]) == {"site_b", "site_c"} and set(r["sites"]) == {"site_b", "site_c"}
        for r in metrics["rounds"]
    )
    assert all(d["site"] == "site_a" for d in metrics["dropped"])


def test_a_site_failing_its_profile_never_joins(tiny_config: dict, site_cache: dict[str, str]) -> None:
    run_in_process(tiny_config, num_nodes=3, node_configs=[site_cache] * 3, client_app=_faulty(MSG_PROFILE, _raise))
    metrics = json.loads((Path(str(tiny_config["out-dir"])) / "tiny" / "metrics.json").read_text())
    assert metrics["sites"] == ["site_b", "site_c"] and metrics["dropped"][0]["phase"] == "profile"
    assert "site crashed" in metrics["dropped"][0]["reason"]


class _SilentGrid(InProcessGrid):
    """Partition 0 never answers train.distill (a timeout)."""

    def _call(self, msg: Message) -> Message | None:
        if msg.metadata.dst_node_id == min(self.contexts) and msg.metadata.message_type == MSG_DISTILL:
            return None
        return super()._call(msg)


def test_a_silent_site_times_out_and_is_dropped_for_the_round(tiny_config: dict, site_cache: dict[str, str]) -> None:
    from server.cli.simulation import task_identity

    server = load_component(component_ref("serverapp"))
    grid = _SilentGrid(
        load_component(component_ref("clientapp")),
        num_nodes=3,
        run_config=tiny_config,
        node_configs=[site_cache] * 3,
        record=True,
    )
    with task_identity():
        server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=tiny_config))
    metrics = json.loads((Path(str(tiny_config["out-dir"])) / "tiny" / "metrics.json").read_text())
    reasons = [d["reason"] for d in metrics["dropped"] if d["site"] == "site_a"]
    assert len(reasons) == 2 and all(
        "no reply (the node left, or stayed silent past round-timeout-s" in r for r in reasons
    )


def test_too_few_sites_stops_with_a_named_reason(tiny_config: dict, site_cache: dict[str, str]) -> None:
    config = {**tiny_config, "min-sites": 3}
    with pytest.raises(FederationStopped) as info:
        run_in_process(config, num_nodes=3, node_configs=[site_cache] * 3, client_app=_faulty(MSG_DISTILL, _raise))
    assert info.value.reason == TOO_FEW_SITES and "distill-1" in str(info.value)
    metrics = json.loads((Path(str(config["out-dir"])) / "tiny" / "metrics.json").read_text())
    assert metrics["stopped"]["reason"] == TOO_FEW_SITES


def test_duplicated_site_name_is_rejected(tiny_config: dict, site_cache: dict[str, str], three_site_h5ad: Path) -> None:
    configs = [{**site_cache, "data-path": str(three_site_h5ad), "site-name": "same"}] * 2 + [site_cache]
    run_in_process(tiny_config, num_nodes=3, node_configs=configs)
    metrics = json.loads((Path(str(tiny_config["out-dir"])) / "tiny" / "metrics.json").read_text())
    assert sorted(metrics["sites"]) == ["same", "site_c"]
    assert any("duplicated site name" in d["reason"] for d in metrics["dropped"])


def test_interrupted_run_resumes_from_the_last_completed_phase(
    tiny_config: dict, site_cache: dict[str, str], interrupt_at_round: Callable[[int], Callable[[], None]]
) -> None:
    let_through = interrupt_at_round(2)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(tiny_config, num_nodes=3, node_configs=[site_cache] * 3)
    run_dir = Path(str(tiny_config["out-dir"])) / "tiny"
    state = json.loads((run_dir / "state" / "state.json").read_text())
    assert state["completed"] == ["pretrain", "round-1"] and not (run_dir / "synthetic.h5ad").exists()
    checkpoint = RunStore(run_dir).load_checkpoint()
    assert checkpoint is not None
    round1_codes = dict(checkpoint.codes)
    assert sorted(round1_codes) == ["site_a", "site_b", "site_c"]
    let_through()
    grid = run_in_process({**tiny_config, "resume": True}, num_nodes=3, node_configs=[site_cache] * 3, record=True)
    assert not any(ex.message_type == MSG_PRETRAIN for ex in grid.log)  # pretraining was not redone
    assert sum(ex.message_type == MSG_DISTILL for ex in grid.log) == 3  # round 2 only
    # nothing lost: round 2 warm-starts every site from its own round-1 codes, kept in the server's checkpoint
    names = {
        ex.node_id: ProfileReply.from_record(ex.reply.content).site_name
        for ex in grid.log
        if ex.message_type == MSG_PROFILE and ex.reply
    }
    for ex in (e for e in grid.log if e.message_type == MSG_DISTILL):
        req, own = DistillRequest.from_record(ex.instruction.content), round1_codes[names[ex.node_id]]
        assert req.warm_codes is not None and req.warm_labels is not None
        assert np.array_equal(req.warm_codes, own.codes) and np.array_equal(req.warm_labels, own.labels)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2] and (run_dir / "synthetic.h5ad").is_file()
    assert all(math.isfinite(r["aggregate"]["cell_weighted"]["mlp"]["accuracy"]) for r in metrics["rounds"])
    # and the interruption cost nothing: the same run without one writes exactly the same round 2
    straight = run_in_process({**tiny_config, "run-id": "straight"}, num_nodes=3, node_configs=[site_cache] * 3)
    del straight
    other = Path(str(tiny_config["out-dir"])) / "straight"
    resumed_cells, straight_cells = ad.read_h5ad(run_dir / "synthetic.h5ad"), ad.read_h5ad(other / "synthetic.h5ad")
    assert np.array_equal(resumed_cells.X.toarray(), straight_cells.X.toarray())
    straight_metrics = json.loads((other / "metrics.json").read_text())
    assert [r["aggregate"] for r in straight_metrics["rounds"]] == [r["aggregate"] for r in metrics["rounds"]]


def test_resume_with_a_changed_config_is_refused(tiny_config: dict, site_cache: dict[str, str]) -> None:
    run_in_process({**tiny_config, "num-distill-rounds": 1}, num_nodes=3, node_configs=[site_cache] * 3)
    with pytest.raises(FederationStopped, match="cells-per-class"):
        run_in_process(
            {**tiny_config, "resume": True, "cells-per-class": 3}, num_nodes=3, node_configs=[site_cache] * 3
        )
    grid = run_in_process(
        {**tiny_config, "resume": True}, num_nodes=3, node_configs=[site_cache] * 3, record=True
    )  # more rounds is fine
    assert sum(ex.message_type == MSG_DISTILL for ex in grid.log) == 3
