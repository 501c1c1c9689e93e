"""One request/reply exchange with the sites: send, wait at most round-timeout-s, validate, account, drop bad sites.

A site that answers with an error, does not answer in time, or sends a reply that fails validation
is logged with its name and left out of that exchange only; the run stops with a named reason
when fewer than min-sites valid replies remain.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from server.errors import NO_SITES_CONNECTED, TOO_FEW_SITES, FederationStopped
from shared.errors import ProtocolError
from shared.protocol import wire_bytes

logger = logging.getLogger(__name__)

P = TypeVar("P")
MAX_REASON = 200  # characters of a site's error text kept in logs and metrics


@dataclass(frozen=True)
class SiteReply(Generic[P]):
    """A validated reply of one site."""

    site: str
    node_id: int
    payload: P
    wire: int


@dataclass
class Link:
    """The live federation: node ids <-> site names, deadlines, upload accounting and dropped-site log."""

    grid: Grid
    timeout_s: float
    min_sites: int
    nodes: dict[int, str] = field(default_factory=dict)  # node id -> site name (after the profile phase)
    upload: dict[str, dict[str, int]] = field(default_factory=dict)  # site -> message type -> bytes
    dropped: list[dict[str, object]] = field(default_factory=list)

    def name(self, node_id: int) -> str:
        """Site name of a node (or a node label before the profile phase named it)."""
        return self.nodes.get(node_id, f"node-{node_id}")

    def drop(self, node_id: int, phase: str, reason: str) -> None:
        """Log and record that a site is left out of ``phase``."""
        site = self.name(node_id)
        logger.warning("site %s dropped from %s: %s", site, phase, reason)
        self.dropped.append({"site": site, "phase": phase, "reason": reason})

    def exchange(
        self,
        message_type: str,
        contents: Mapping[int, RecordDict],
        phase: str,
        check: Callable[[int, RecordDict, int], P],
    ) -> list[SiteReply[P]]:
        """Send ``contents`` (node id -> content) and return validated replies sorted by site name."""
        messages = [
            Message(c, dst_node_id=n, message_type=message_type, group_id=phase, ttl=self.timeout_s + 60.0)
            for n, c in contents.items()
        ]
        t0 = time.perf_counter()
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout_s))
        out = self._collect(message_type, contents, phase, replies, check)
        logger.info(
            "%s: %d/%d sites answered validly in %.1f s", phase, len(out), len(contents), time.perf_counter() - t0
        )
        if len(out) < self.min_sites:
            raise FederationStopped(TOO_FEW_SITES, f"{phase}: {len(out)} valid replies, min-sites={self.min_sites}")
        return sorted(out, key=lambda r: r.site)

    def _collect(
        self,
        message_type: str,
        contents: Mapping[int, RecordDict],
        phase: str,
        replies: Iterable[Message],
        check: Callable[[int, RecordDict, int], P],
    ) -> list[SiteReply[P]]:
        out: list[SiteReply[P]] = []
        answered: set[int] = set()
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if node not in contents or node in answered:
                logger.warning("%s: ignoring an unexpected or repeated reply from node %d", phase, node)
                continue
            answered.add(node)
            if reply.has_error():
                self.drop(node, phase, f"error reply (code {reply.error.code}): {str(reply.error.reason)[:MAX_REASON]}")
                continue
            wire = wire_bytes(reply.content)
            try:
                payload = check(node, reply.content, wire)
            except ProtocolError as exc:
                self.drop(node, phase, f"rejected reply: {str(exc)[:MAX_REASON]}")
                continue
            finally:  # bytes that arrived count, accepted or not (the check may have named the node)
                per_type = self.upload.setdefault(self.name(node), {})
                per_type[message_type] = per_type.get(message_type, 0) + wire
            out.append(SiteReply(self.name(node), node, payload, wire))
        for node in sorted(set(contents) - answered):
            self.drop(
                node, phase, f"no reply (the node left, or stayed silent past round-timeout-s={self.timeout_s:g})"
            )
        return out


def wait_for_nodes(grid: Grid, *, min_sites: int, expected: int, deadline_s: float, poll_s: float = 1.0) -> list[int]:
    """Node ids once ``max(min_sites, expected)`` are connected, or whatever is there at the deadline (if >=
    min_sites)."""
    want = max(min_sites, expected)
    end = time.monotonic() + deadline_s
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= want:
            break
        if time.monotonic() >= end:
            if len(nodes) >= min_sites:
                break
            raise FederationStopped(
                NO_SITES_CONNECTED, f"{len(nodes)} of min-sites={min_sites} connected after {deadline_s:g} s"
            )
        time.sleep(poll_s)
    logger.info("%d SuperNodes connected (waiting for %d)", len(nodes), want)
    return nodes
