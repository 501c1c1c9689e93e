"""Why a federated run stops early: named reasons, each with a help text for the operator."""

from __future__ import annotations

from shared.errors import FedscddError

TOO_FEW_SITES = "too-few-sites"
NO_SITES_CONNECTED = "no-sites-connected"
NO_PLAN = "no-common-plan"
RESUME_MISMATCH = "resume-mismatch"
NOTHING_RELEASED = "nothing-released"

STOP_REASONS: dict[str, str] = {
    NO_SITES_CONNECTED: (
        "fewer than min-sites SuperNodes connected within site-wait-s; check that the sites' SuperNodes run "
        "and reach the SuperLink, or lower min-sites"
    ),
    TOO_FEW_SITES: (
        "fewer than min-sites sites sent a valid reply within round-timeout-s; the coordinator log names each "
        "dropped site and why (error reply, timeout, rejected reply); fix those sites or raise round-timeout-s"
    ),
    NO_PLAN: (
        "the sites' profiles admit no common plan (no shared genes or no classes); check gene identifiers and label-key"
    ),
    NOTHING_RELEASED: (
        "under DP no site released a cell type with enough cells to pretrain on; raise dp-epsilon, add sites, or "
        "use dp-pretraining=dp-sgd"
    ),
    RESUME_MISMATCH: "resume=true found a run directory written with another plan-relevant config; use a new run-id "
    "or the original config",
}


class FederationStopped(FedscddError):
    """The run stopped before completing; ``reason`` is a key of STOP_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in STOP_REASONS:
            msg = f"unknown stop reason {reason!r}"
            raise ValueError(msg)
        self.reason = reason
        self.detail = detail
        super().__init__(f"federation stopped ({reason}): {detail}. {STOP_REASONS[reason]}")
