"""Loopback deployment, following deploy/README.md with its own commands and scripts: TLS SuperLink with SuperNode
authentication, three registered sites, one refused intruder, a real run during which one site is killed.

The guide's steps in order: ``scdd certs``, ``start-superlink.sh``, ``scdd flwr-connection`` over the config
`flwr` writes on first use, ``register-sites.sh`` (run twice: the second run must succeed too), ``scdd check``
at a site, ``start-supernode.sh`` per site, ``flwr run . fedscdd`` from the checkout without out-dir, and
``scdd verify-bundle`` at a site. Everything runs on 127.0.0.1 with free ports and separate FLWR_HOMEs; the
sites hold the bundled Kang PBMC file split by sample. Once round 1 is checkpointed, site-c's SuperNode is
killed (by PID): the run must finish round 2 with the other two. Every process this test starts is stopped
by PID (its whole process group) in the fixture teardown.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import anndata as ad

# deploy_helpers is beside this file; pytest's default "prepend" import mode puts tests/integration/ on sys.path
import deploy_helpers as dh
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
EXAMPLE = REPO / "shared" / "example_data" / "kang_pbmc_muscat.h5ad"
CONNECTION = "fedscdd"  # the guide's connection name
SITES = {"site-a": ("ctrl101",), "site-b": ("ctrl107",), "site-c": ("stim101", "stim107")}
VICTIM = "site-c"  # killed after round 1
INTRUDER = "intruder"

STARTUP_S = 60.0  # SuperLink health, SuperNodes online, intruder refused
CLI_S = 60.0  # one flwr CLI call
RUN_S = 540.0  # the whole federated run (8 round trips on 2 busy cores, plus Flower noticing the killed site: ~50 s)

# Smallest budgets the ServerApp accepts: 1 pretraining round per stage, 2 distillation rounds
# -> profile, VAE, latent stats, SCDG, 2 x (distill, evaluate) = 8 round trips (one ClientApp process each).
N_GENES = 100
RUN_CONFIG = {
    "label-key": '"cell_type"',
    "n-genes": str(N_GENES),
    "latent-dim": "16",
    "num-pretrain-rounds": "1",
    "vae-local-steps": "10",
    "scdg-local-steps": "10",
    "vae-batch-size": "64",
    "scdg-batch-size": "64",
    "cells-per-class": "2",
    "num-distill-rounds": "2",
    "distill-iterations": "5",
    "finetune-steps": "2",
    "mlp-min-steps": "10",
    "mlp-max-steps": "10",
    "min-sites": "2",
    "expected-sites": "3",
    "site-wait-s": "60.0",
    "round-timeout-s": "180.0",
    "report": "true",
    "torch-threads": "1",
}


@pytest.fixture
def procs() -> Iterator[list[dh.Proc]]:
    """Processes this test started; all stopped (SIGTERM, then SIGKILL to the group) at teardown, newest first."""
    started: list[dh.Proc] = []
    yield started
    for proc in reversed(started):
        dh.stop(proc)
    still = [p.name for p in started if p.alive()]
    assert not still, f"processes survived teardown: {still}"


def _split_example(out: Path) -> dict[str, Path]:
    adata = ad.read_h5ad(EXAMPLE)
    paths: dict[str, Path] = {}
    for site, batches in SITES.items():
        part = adata[adata.obs["batch"].astype(str).isin(batches).to_numpy()].copy()
        assert part.n_obs > 0, f"no cells for {site} ({batches})"
        paths[site] = out / f"{site}.h5ad"
        part.write_h5ad(paths[site])
    return paths


def _build_fab(out: Path) -> Path:
    """`flwr build` of the checkout into ``out`` (the same builder `flwr run` uses); the .fab path."""
    out.mkdir()
    res = dh.flwr(["build", "--app", str(REPO)], dh.flower_env(out / "home"), timeout=CLI_S, cwd=out)
    fabs = sorted(out.glob("*.fab"))
    hint = ""
    if "- .gitignore" in res.stderr:
        # flwr 1.42 keeps /.gitignore as a candidate file, then rejects it as soon as fab-include or fab-exclude is set
        hint = 'add ".gitignore" to fab-exclude in [tool.flwr.app] of pyproject.toml; '
    assert res.returncode == 0 and len(fabs) == 1, (
        f"the app does not build into a FAB, so `flwr run` cannot start it ({hint}check [tool.flwr.app] "
        f"fab-include/fab-exclude in pyproject.toml):\n{res.describe()}"
    )
    return fabs[0]


def _node_status(cli_env: dict[str, str]) -> dict[str, str]:
    res = dh.flwr(["supernode", "list", CONNECTION, "--format", "json"], cli_env, timeout=CLI_S)
    assert res.returncode == 0, res.describe()
    return {str(n["node-id"]): str(n["status"]) for n in dh.json_from_output(res.stdout)["nodes"]}


def _runs(cli_env: dict[str, str], run_id: int | None = None) -> list[dict]:
    args = ["ls", CONNECTION, "--format", "json"] + (["--run-id", str(run_id)] if run_id is not None else [])
    res = dh.flwr(args, cli_env, timeout=CLI_S)
    assert res.returncode == 0, res.describe()
    data = dh.json_from_output(res.stdout)
    assert data.get("success") is True, res.describe()
    return list(data["runs"])


def _registry(path: Path) -> dict[str, str]:
    """register-sites.sh's mapping file: {site name: node id}."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].split("\t") == ["name", "node_id", "key_sha256", "registered_at"], lines[0]
    return {row.split("\t")[0]: row.split("\t")[1] for row in lines[1:]}


def test_the_deployment_guide_runs_the_app_and_survives_a_killed_site(tmp_path: Path, procs: list[dh.Proc]) -> None:
    t_start = time.monotonic()
    logs = tmp_path / "logs"
    logs.mkdir()
    scdd = dh.executable("scdd")

    # guide §1: certificates and site keys; the intruder makes its own key, which is never registered
    certs = tmp_path / "certs"
    base_env = dh.flower_env(tmp_path / "home-tools")
    res = dh.command(
        [
            scdd,
            "certs",
            "--out",
            certs,
            "--san",
            dh.HOST,
            "--san",
            "localhost",
            *(a for s in SITES for a in ("--site", s)),
        ],
        base_env,
        timeout=CLI_S,
    )
    assert res.returncode == 0, res.describe()
    res = dh.command(
        [scdd, "certs", "--out", tmp_path / "rogue", "--sites-only", "--site", INTRUDER], base_env, timeout=CLI_S
    )
    assert res.returncode == 0, res.describe()
    ca = certs / "ca.crt"
    keys = certs / "sites"

    link_port, *node_ports = dh.free_ports(1 + len(SITES) + 1)
    address = f"{dh.HOST}:{link_port}"

    # guide §2.3: start-superlink.sh (TLS, SuperNode auth, database, outputs under the state directory), 127.0.0.1 only.
    # It runs from a working directory of its own: outputs must not land relative to it.
    state = tmp_path / "state"
    link_cwd = tmp_path / "superlink-cwd"
    link_cwd.mkdir()
    link_env = {
        **dh.flower_env(state / "flwr-home"),
        "FEDSCDD_CERT_DIR": str(certs),
        "FEDSCDD_STATE_DIR": str(state),
        "FEDSCDD_SUPERLINK_HOST": dh.HOST,
        "FEDSCDD_SUPERLINK_PORT": str(link_port),
    }
    link = dh.start("superlink", [str(DEPLOY / "coordinator" / "start-superlink.sh")], link_env, logs, cwd=link_cwd)
    procs.append(link)

    # while it starts: the FAB that `flwr run` will ship builds from the checkout and holds code only ...
    fab = _build_fab(tmp_path / "fab")
    with zipfile.ZipFile(fab) as zf:
        names = zf.namelist()
    assert {"server/app.py", "client/app.py", "pyproject.toml"} <= set(names), names
    leaked = [
        n
        for n in names
        if n.startswith(("tests/", "deploy/", "benchmarks/")) or n.endswith((".h5ad", ".pt", ".pem", ".key"))
    ]
    assert not leaked, f"the FAB ships files it should not: {leaked}"
    # ... the real data is split by donor into the sites' files, and a site checks its file as the guide says (§3.1)
    data = _split_example(tmp_path)
    res = dh.command([scdd, "check", data["site-a"].resolve(), "--label-key", "cell_type"], base_env, timeout=CLI_S)
    assert res.returncode == 0 and "OK: this file can join a federation." in res.stdout, res.describe()

    healthy = dh.wait_until(lambda: dh.https_ok(f"https://{address}/health", ca), STARTUP_S, procs=[link])
    assert healthy, f"SuperLink not healthy after {STARTUP_S:g} s:\n{link.tail()}"
    assert f"run outputs: {state / 'runs'}/run-<run id>/" in link.log_text(), link.tail()

    def diagnostics() -> str:
        return "\n".join(dh.iter_logs(procs))

    # guide §2.4: `flwr` has already written its own config.toml (the trap); scdd flwr-connection merges the connection
    cli_env = dh.flower_env(tmp_path / "home-cli")
    first = dh.flwr(["config", "list"], cli_env, timeout=CLI_S)
    assert first.returncode == 0 and "local (default)" in first.stdout, first.describe()
    res = dh.command(
        [scdd, "flwr-connection", CONNECTION, "--address", address, "--root-certificates", ca], cli_env, timeout=CLI_S
    )
    assert res.returncode == 0 and "healthy" in res.stdout, res.describe()
    listed = dh.flwr(["config", "list"], cli_env, timeout=CLI_S)
    assert f"{CONNECTION} (default)" in listed.stdout and "local" in listed.stdout, listed.describe()

    # register-sites.sh: every key registered, the name <-> node id mapping written; a second run succeeds and keeps it
    register = [str(DEPLOY / "coordinator" / "register-sites.sh"), str(keys), CONNECTION]
    res = dh.command(register, cli_env, timeout=3 * CLI_S)
    assert res.returncode == 0, res.describe()
    registered = _registry(keys / "registered.tsv")
    assert set(registered) == set(SITES) and all(v.isdigit() for v in registered.values()), registered
    assert set(_node_status(cli_env)) == set(registered.values())
    again = dh.command(register, cli_env, timeout=3 * CLI_S)
    assert again.returncode == 0 and again.stdout.count("already registered") == len(SITES), again.describe()
    assert _registry(keys / "registered.tsv") == registered
    for site, node in registered.items():  # the listing shows names beside node ids
        assert re.search(rf"^{site}\s+{node}\s+registered$", again.stdout, re.M), again.describe()

    # guide §3.2: start-supernode.sh per site (and for the intruder, whose key was never registered)
    nodes: dict[str, dh.Proc] = {}
    for name, port in zip([*SITES, INTRUDER], node_ports, strict=True):
        key_dir = keys if name in SITES else tmp_path / "rogue" / "sites"
        node_env = {
            **dh.flower_env(tmp_path / f"home-{name}"),
            "FEDSCDD_SUPERLINK": address,
            "FEDSCDD_SITE_NAME": name,
            "FEDSCDD_DATA_PATH": str(data.get(name, data["site-a"]).resolve()),
            "FEDSCDD_ROOT_CERT": str(ca),
            "FEDSCDD_SITE_KEY": str(key_dir / name),
            "FEDSCDD_SUPERNODE_PORT": str(port),
            "FEDSCDD_CACHE_DIR": str((tmp_path / f"cache-{name}").resolve()),
        }
        nodes[name] = dh.start(
            f"supernode-{name}", [str(DEPLOY / "site" / "start-supernode.sh")], node_env, logs, cwd=tmp_path
        )
        procs.append(nodes[name])

    rc = dh.wait_exit(nodes[INTRUDER], STARTUP_S)
    intruder_log = nodes[INTRUDER].log_text()
    assert rc is not None and rc != 0, f"unregistered SuperNode was not refused (rc={rc}):\n{diagnostics()}"
    assert "Failed to activate SuperNode" in intruder_log, intruder_log
    assert "No SuperNode found with the given public key" in link.log_text()

    seen: dict[str, str] = {}

    def sites_online() -> bool:
        seen.clear()
        seen.update(_node_status(cli_env))
        return all(seen.get(node) == "online" for node in registered.values())

    online = dh.wait_until(sites_online, STARTUP_S, interval=1.0, procs=[link, *(nodes[s] for s in SITES)])
    assert online, f"registered SuperNodes not online after {STARTUP_S:g} s: {seen}\n{diagnostics()}"
    assert set(seen) == set(registered.values()), seen  # the intruder left no node behind

    # guide §2.5: `flwr run . fedscdd` from the checkout, no out-dir: outputs go to the coordinator's state directory
    run_config = " ".join(f"{k}={v}" for k, v in RUN_CONFIG.items())
    t_run = time.monotonic()
    res = dh.flwr(["run", ".", CONNECTION, "--run-config", run_config], cli_env, timeout=RUN_S, cwd=REPO)
    (logs / "flwr-run.log").write_text(res.describe(), encoding="utf-8")
    m = re.search(r"Successfully started run (\d+)", res.stdout)
    assert res.returncode == 0 and m is not None, res.describe()
    runs = _runs(cli_env)
    assert len(runs) == 1, f"expected exactly one run: {runs}\n{res.describe()}"
    run_id = int(runs[0]["run-id"])
    assert int(m.group(1)) == run_id, res.describe()
    run_dir = state / "runs" / f"run-{run_id}"
    checkpoint = run_dir / "state" / "state.json"
    run = runs[0]

    def round_1_done() -> bool:
        return checkpoint.is_file() and "round-1" in json.loads(checkpoint.read_text(encoding="utf-8"))["completed"]

    def finished() -> bool:
        nonlocal run
        run = _runs(cli_env, run_id)[0]
        return str(run["status"]).startswith("finished")

    # kill one site (SIGKILL to its process group, by PID) as soon as round 1 is checkpointed, then let the run finish
    polled = [time.monotonic()]

    def round_1_done_or_run_over() -> bool:
        if round_1_done():
            return True
        if time.monotonic() - polled[0] > 15.0:  # the file check is cheap; the status query is a CLI call
            polled[0] = time.monotonic()
            return finished()
        return False

    dh.wait_until(round_1_done_or_run_over, RUN_S, interval=0.2, procs=[link])
    assert round_1_done(), f"round 1 not checkpointed in {run_dir} (run status {run['status']!r})\n{diagnostics()}"
    dh.kill(nodes[VICTIM])
    assert not nodes[VICTIM].alive()
    done = dh.wait_until(finished, max(10.0, RUN_S - (time.monotonic() - t_run)), interval=2.0, procs=[link])
    run_seconds = time.monotonic() - t_run
    app_log = dh.flwr(["log", str(run_id), CONNECTION, "--show"], cli_env, timeout=CLI_S)
    (logs / "flwr-log.log").write_text(app_log.describe(), encoding="utf-8")
    if not done:
        dh.flwr(["stop", str(run_id), CONNECTION], cli_env, timeout=CLI_S)
    assert run["status"] == "finished:completed", (
        f"run {run_id} status {run['status']!r} after {run_seconds:.0f} s\n"
        f"===== flwr log {run_id} --show\n{app_log.describe()}\n{diagnostics()}"
    )
    assert all(nodes[s].alive() for s in SITES if s != VICTIM) and link.alive(), diagnostics()
    # the coordinator's phase lines reach Flower's run log and the run's own run.log beside the outputs
    assert "server.orchestration: plan:" in app_log.stdout and "round 2:" in app_log.stdout, app_log.describe()
    run_log = (run_dir / "run.log").read_text(encoding="utf-8")
    for line in (f"outputs go to {run_dir}", "plan:", "round 1:", "round 2:", "complete"):
        assert line in run_log, f"{line!r} not in {run_dir / 'run.log'}:\n{run_log}"
    assert not list(link_cwd.iterdir()), (
        f"outputs landed in the SuperLink's working directory: {list(link_cwd.iterdir())}"
    )

    # the run shipped exactly the FAB built from the checkout above, and each site installed it under its hash
    fab_hash = hashlib.sha256(fab.read_bytes()).hexdigest()
    assert run["fab-hash"] == fab_hash, (run, fab_hash)
    for site in SITES:
        installed = sorted(p.name for p in (tmp_path / f"home-{site}" / "apps").glob(f"*.{fab_hash[:8]}"))
        assert len(installed) == 1, f"{site}: no app installed for FAB {fab_hash[:8]}"

    # guide, "Sites run the code the coordinator sends": scdd verify-bundle passes on the installed app, fails on a
    # changed copy
    verify = [scdd, "verify-bundle", tmp_path / "home-site-a", "--source", REPO, "--fab-hash", run["fab-hash"]]
    res = dh.command(verify, base_env, timeout=CLI_S)
    assert res.returncode == 0 and "OK: the" in res.stdout, res.describe()
    tampered = tmp_path / "tampered" / "apps"
    shutil.copytree(tmp_path / "home-site-a" / "apps", tampered)
    app_py = next(tampered.glob("*/client/app.py"))
    app_py.write_text(app_py.read_text(encoding="utf-8") + "\n# one added line\n", encoding="utf-8")
    res = dh.command([scdd, "verify-bundle", tampered, "--source", REPO], base_env, timeout=CLI_S)
    assert res.returncode == 1 and "changed: client/app.py" in res.stdout and "MISMATCH" in res.stdout, res.describe()

    # outputs: <FEDSCDD_OUT_DIR>/run-<flower run id>/ (server/app.py + server/run_store.py)
    for name in ("synthetic.h5ad", "metrics.json", "report.html", "config.json", "plan.json"):
        assert (run_dir / name).is_file(), f"{name} missing in {run_dir}: {sorted(p.name for p in run_dir.glob('*'))}"
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["sites"] == sorted(SITES)
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    first, last = metrics["rounds"]
    assert set(first["sites_distilled"]) == set(SITES)  # everyone in round 1
    assert set(last["sites_distilled"]) == set(SITES) - {VICTIM} and set(last["sites"]) == set(SITES) - {
        VICTIM
    }  # the killed site is left out
    dropped = {(d["site"], d["phase"]) for d in metrics["dropped"]}
    assert (VICTIM, "distill-2") in dropped and all(site == VICTIM for site, _ in dropped), metrics["dropped"]
    for site in SITES:
        assert set(metrics["upload_bytes"][site]) >= {
            "query.profile",
            "train.pretrain",
            "train.distill",
            "evaluate.models",
        }
    for site in set(SITES) - {VICTIM}:
        assert last["sites"][site]["n_test"] > 0
        acc = last["sites"][site]["scores"]["mlp"]["accuracy"]
        assert math.isfinite(acc) and 0.0 <= acc <= 1.0
    synth = ad.read_h5ad(run_dir / "synthetic.h5ad")
    assert synth.n_obs == last["n_synthetic"] > 0 and synth.n_vars == N_GENES
    assert set(synth.obs["site"].astype(str)) == set(SITES) - {VICTIM}
    assert "<html" in (run_dir / "report.html").read_text(encoding="utf-8").lower()
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert config["run_dir"] == str(run_dir) and config["run_config"]["num-distill-rounds"] == 2

    print(f"\ndeployment test: run {run_id} took {run_seconds:.1f} s, whole test {time.monotonic() - t_start:.1f} s")
