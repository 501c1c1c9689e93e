"""What a site has released under DP in a run: one entry per release slot, so that no slot is released twice.

A DP-SGD round is a release of fresh noise on the weights the coordinator sent. The site's accountant
counts each promised round once, so a second, different request for the same round (another set of
weights) would spend budget the accountant never saw: the ledger refuses it. The same request again
(a retry, a resumed run) is allowed: its noise is keyed by the slot, so it releases the same values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from shared.errors import ProtocolError
from shared.io import atomic_path


def digest(obj: Any) -> str:
    """SHA-256 of bytes or of a state dict (names, shapes and raw bytes in name order)."""
    h = hashlib.sha256()
    if isinstance(obj, bytes):
        h.update(obj)
    else:
        for k in sorted(obj):
            v = obj[k]
            h.update(k.encode())
            h.update(str(getattr(v, "shape", "")).encode())
            h.update(v.tobytes() if hasattr(v, "tobytes") else repr(v).encode())
    return h.hexdigest()


def claim(cache: Path, site_key: str, run_key: str, slot: str, content: str) -> None:
    """Record that ``slot`` of ``run_key`` releases ``content`` (a digest); ProtocolError when it released something
    else."""
    name = hashlib.sha256(json.dumps([site_key, run_key]).encode()).hexdigest()[:20]
    path = cache / f"dp-ledger-{name}.json"
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        entries = {}
    if slot in entries:
        if entries[slot] != content:
            msg = (
                f"refused: {slot} was already released in this run with other inputs, "
                "and the DP budget counts each release once; start a new run (a new run-id) instead"
            )
            raise ProtocolError(msg)
        return
    entries[slot] = content
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(entries, indent=1), encoding="utf-8")
