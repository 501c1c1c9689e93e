"""The ServerApp's INFO lines reach stderr, which Flower mirrors into the run log (flwr log)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from server.app import _progress_to_run_log


@pytest.fixture
def clean_loggers() -> Iterator[logging.Logger]:
    root, log = logging.getLogger(), logging.getLogger("server")
    saved = (list(root.handlers), root.level, list(log.handlers), log.level, log.propagate)
    root.handlers, log.handlers = [], []
    yield root
    root.handlers, root.level, log.handlers, log.level, log.propagate = saved[0], saved[1], saved[2], saved[3], saved[4]


def test_info_lines_reach_stderr_when_nothing_is_configured(
    clean_loggers: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_loggers.setLevel(logging.WARNING)
    _progress_to_run_log()
    _progress_to_run_log()  # idempotent: one handler, one line
    logging.getLogger("server.orchestration").info("plan: %d genes", 7)
    assert capsys.readouterr().err.count("INFO server.orchestration: plan: 7 genes") == 1


def test_info_lines_reach_stderr_under_a_root_handler_at_warning(
    clean_loggers: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_loggers.addHandler(logging.StreamHandler())  # e.g. a library called logging.basicConfig()
    clean_loggers.setLevel(logging.WARNING)
    _progress_to_run_log()
    logging.getLogger("server.orchestration").info("round %d done", 1)
    logging.getLogger("server.orchestration").warning("site dropped")
    err = capsys.readouterr().err
    assert "round 1 done" in err and err.count("site dropped") == 1


def test_a_host_that_shows_info_keeps_its_own_setup(clean_loggers: logging.Logger) -> None:
    clean_loggers.addHandler(logging.NullHandler())
    clean_loggers.setLevel(logging.INFO)
    _progress_to_run_log()
    assert not any(getattr(h, "fedscdd_run_log", False) for h in logging.getLogger("server").handlers)


def test_run_log_holds_the_runs_lines_and_is_fresh_unless_resumed(clean_loggers: logging.Logger, tmp_path) -> None:
    from server.run_store import run_log

    logging.getLogger("server").setLevel(logging.INFO)
    path = tmp_path / "run-1" / "run.log"
    with run_log(path, fresh=True):
        logging.getLogger("server.orchestration").info("plan: %d genes", 7)
    logging.getLogger("server.orchestration").info("after the run")  # not this run's: not in the file
    assert "INFO server.orchestration: plan: 7 genes" in path.read_text() and "after the run" not in path.read_text()
    with run_log(path, fresh=False):  # a resumed run appends
        logging.getLogger("server.orchestration").warning("resuming")
    assert "plan: 7 genes" in path.read_text() and "WARNING server.orchestration: resuming" in path.read_text()
    with run_log(path, fresh=True):
        pass
    assert path.read_text() == ""
    assert not any(
        isinstance(h, logging.FileHandler) for h in logging.getLogger("server").handlers
    )  # gone after the block
