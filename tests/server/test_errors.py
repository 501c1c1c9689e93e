"""Every stop reason the orchestrator can raise has an operator help text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server import errors
from server.errors import STOP_REASONS, FederationStopped


def test_every_stop_reason_constant_has_help_text() -> None:
    constants = {v for k, v in vars(errors).items() if k.isupper() and isinstance(v, str) and k != "STOP_REASONS"}
    assert constants == set(STOP_REASONS) and all(len(text) > 40 for text in STOP_REASONS.values())


def test_every_raised_reason_is_a_known_constant() -> None:
    used = set()
    for path in (Path(errors.__file__).parent).glob("*.py"):
        used |= set(re.findall(r"raise FederationStopped\((\w+)", path.read_text()))
    assert used and used <= {k for k in vars(errors) if k.isupper()}


def test_stop_message_names_reason_detail_and_help() -> None:
    exc = FederationStopped(errors.TOO_FEW_SITES, "distill-1: 1 valid replies")
    assert errors.TOO_FEW_SITES in str(exc) and "distill-1" in str(exc) and "round-timeout-s" in str(exc)
    with pytest.raises(ValueError, match="unknown stop reason"):
        FederationStopped("bad-reason", "x")
