"""`scdd demo` plumbing that needs no Ray: the staged Flower app builds a clean FAB; process bookkeeping."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

from server.cli.demo import DEMO_RUN_CONFIG, _toml_str, demo_run_config, stage_app
from server.cli.processes import started_pids, stop_session
from server.config import FederationConfig


def test_staged_app_builds_a_fab_with_code_only(tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk

    app = stage_app(tmp_path / "app")
    fab = build_fab_from_disk(app)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert {"client/app.py", "server/app.py", "shared/protocol/codec.py", "pyproject.toml"} <= set(names)
    assert not [n for n in names if n.startswith("tests/") or n.endswith((".h5ad", ".pt", ".npz"))]
    assert len(fab) < 10 * 1024 * 1024


def test_run_config_values_are_toml() -> None:
    assert _toml_str("/a b/c.h5ad") == '"/a b/c.h5ad"' and _toml_str(True) == "true" and _toml_str(4) == "4"


def test_the_demo_runs_its_own_shorter_pretraining_and_set_values_win(tmp_path: Path) -> None:
    data, out = tmp_path / "kang.h5ad", tmp_path / "runs" / "demo"
    cfg = demo_run_config(data, out, None)
    assert cfg["num-pretrain-rounds"] == 10 < FederationConfig().num_pretrain_rounds
    assert (cfg["sim-data-path"], cfg["out-dir"], cfg["run-id"]) == (str(data), str(out.parent), "demo")
    full = demo_run_config(data, out, {"num-pretrain-rounds": 30, "seed": 3})
    assert full["num-pretrain-rounds"] == 30 and full["seed"] == 3
    assert set(DEMO_RUN_CONFIG) <= {k.replace("_", "-") for k in FederationConfig.__dataclass_fields__}


def test_stop_session_ends_the_leader_and_what_it_started() -> None:
    code = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    )
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    for _ in range(50):
        if len(started_pids(leader.pid)) == 2:
            break
        subprocess.run(["sleep", "0.1"], check=True)
    pids = stop_session(leader, grace_s=5)
    assert len(pids) == 2 and pids[-1] == leader.pid
    assert all(
        not Path(f"/proc/{p}").exists() or "Z" in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        for p in pids
    )


def test_sigterm_runs_the_demos_cleanup_and_fails_with_a_named_reason() -> None:
    import os
    import signal

    import pytest

    from server.cli.demo import DemoFailed, _signals_raise

    cleaned: list[str] = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(DemoFailed, match="stopped by SIGTERM"), _signals_raise():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs between bytecodes
                subprocess.run(["sleep", "0.05"], check=True)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal during cleanup does not interrupt it
            cleaned.append("stopped the SuperLink session")
    assert cleaned == ["stopped the SuperLink session"]
    assert signal.getsignal(signal.SIGTERM) == before  # restored after the block
