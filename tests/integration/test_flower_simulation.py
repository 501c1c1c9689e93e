"""The REAL Flower simulation (flwr run, Ray) end to end: `scdd demo` in a temp FLWR_HOME, bounded waits,
and exactly the processes it started stopped by PID. Slow (Ray start-up): run with `pytest -m slow`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.cli import demo

SMALL = {
    "num-pretrain-rounds": 2,
    "vae-local-steps": 150,
    "scdg-local-steps": 30,
    "scdg-batch-size": 64,
    "pretrain-lr": 0.002,
    "n-genes": 300,
    "latent-dim": 32,
    "distill-iterations": 10,
    "mlp-min-steps": 150,
    "mlp-max-steps": 150,
    "num-distill-rounds": 2,
}  # = the fast kang test


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def stopped(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """PIDs the demo stopped (recorded by wrapping stop_session)."""
    pids: list[int] = []
    real = demo.stop_session

    def record(proc, grace_s: float = 10.0):
        pids.extend(real(proc, grace_s))
        return pids

    monkeypatch.setattr(demo, "stop_session", record)
    return pids


@pytest.mark.slow
def test_flwr_run_simulation_completes_and_leaves_no_process(tmp_path: Path, stopped: list[int]) -> None:
    lines: list[str] = []
    result = demo.run_demo(tmp_path / "demo", timeout_s=900, overrides=SMALL, echo=lines.append)
    assert result.status == demo.COMPLETED and result.run_dir == tmp_path / "demo"
    for name in (
        "report.html",
        "synthetic.h5ad",
        "metrics.json",
        "plan.json",
        "vae.pt",
        "scdg.pt",
        "mlp.pt",
        "config.json",
    ):
        assert (result.run_dir / name).is_file(), name
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["sites"] == ["ctrl101", "ctrl107", "stim101", "stim107"] and len(metrics["rounds"]) == 2
    assert metrics["rounds"][-1]["aggregate"]["cell_weighted"]["mlp"]["accuracy"] > 0.6
    assert any("round 2:" in line for line in lines)  # the coordinator's progress reaches the run log
    assert len(stopped) >= 2 and not [p for p in stopped if _alive(p)]
    assert (tmp_path / "demo" / ".flwr" / "config.toml").is_file()  # FLWR_HOME stayed under the run directory


@pytest.mark.slow
def test_a_failed_flower_run_is_reported_as_failed(tmp_path: Path, stopped: list[int]) -> None:
    with pytest.raises(demo.DemoFailed, match="finished:failed"):
        demo.run_demo(tmp_path / "bad", timeout_s=600, overrides={"cells-per-class": 0}, echo=lambda _line: None)
    assert stopped and not [p for p in stopped if _alive(p)]
