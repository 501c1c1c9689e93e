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


def test_info_lines_reach_stderr_when_nothing_is_configured(clean_loggers: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    clean_loggers.setLevel(logging.WARNING)
    _progress_to_run_log()
    _progress_to_run_log()  # idempotent: one handler, one line
    logging.getLogger("server.orchestration").info("plan: %d genes", 7)
    assert capsys.readouterr().err.count("INFO server.orchestration: plan: 7 genes") == 1


def test_info_lines_reach_stderr_under_a_root_handler_at_warning(clean_loggers: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
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
