"""In-process federation without Ray: a Grid that calls the ClientApp synchronously, one Context per fake node.

The ClientApp is loaded by its component reference from pyproject.toml (``client.app:app``), never
imported statically: ``server/`` and ``client/`` do not import each other.
"""

from __future__ import annotations

import importlib
import logging
import tomllib
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CLIENTAPP = "client.app:app"
DEFAULT_SERVERAPP = "server.app:app"
FIRST_NODE_ID = 1000
CLIENT_APP_RAISED_EXCEPTION = 2  # Flower's error code for an exception in a ClientApp

ClientAppFn = Callable[[Message, Context], Message]


def component_ref(kind: str, pyproject: Path = REPO / "pyproject.toml") -> str:
    """``serverapp`` / ``clientapp`` reference from [tool.flwr.app.components] (defaults when not in a checkout)."""
    default = DEFAULT_CLIENTAPP if kind == "clientapp" else DEFAULT_SERVERAPP
    if not pyproject.is_file():
        return default
    with pyproject.open("rb") as fh:
        data = tomllib.load(fh)
    return str(data.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get(kind, default))


def app_config_defaults(pyproject: Path = REPO / "pyproject.toml") -> dict[str, Any]:
    """[tool.flwr.app.config] of the checkout ({} when not in a checkout)."""
    if not pyproject.is_file():
        return {}
    with pyproject.open("rb") as fh:
        return dict(tomllib.load(fh).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def load_component(ref: str) -> Any:
    """Import ``module:attribute``."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@contextmanager
def task_identity(run_id: int = 1, node_id: int = 0) -> Iterator[None]:
    """Set Flower's (internal) task identity so that Messages can be built outside a Flower runtime."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)  # internal API of the pinned flwr 1.42
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


@dataclass(frozen=True)
class Exchange:
    """One instruction and the reply (or None when the grid dropped it) of the in-process grid."""

    node_id: int
    message_type: str
    instruction: Message
    reply: Message | None


class InProcessGrid(Grid):
    """A Grid whose nodes are Contexts in this process; ``push_messages`` runs the ClientApp synchronously."""

    def __init__(
        self,
        client_app: ClientAppFn,
        *,
        num_nodes: int,
        run_config: Mapping[str, Any],
        node_configs: Sequence[Mapping[str, Any]] | None = None,
        run_id: int = 1,
        record: bool = False,
    ) -> None:
        self._client_app = client_app
        self._record = record  # keep every exchange in .log (tests; costs the memory of every message)
        self._run = Run.create_empty(run_id)
        self.contexts: dict[int, Context] = {}
        for i in range(num_nodes):
            extra = dict(node_configs[i]) if node_configs else {}
            node_config = {"partition-id": i, "num-partitions": num_nodes, **extra}
            self.contexts[FIRST_NODE_ID + i] = Context(
                run_id=run_id,
                node_id=FIRST_NODE_ID + i,
                node_config=node_config,
                state=RecordDict(),
                run_config=dict(run_config),
            )
        self._pending: dict[str, Message] = {}
        self.log: list[Exchange] = []

    def set_run(self, run: Run) -> None:
        """Set the run."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run."""
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """Build an instruction message."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The fake nodes."""
        return list(self.contexts)

    def _call(self, msg: Message) -> Message | None:
        ctx = self.contexts.get(msg.metadata.dst_node_id)
        if ctx is None:
            return None
        try:
            return self._client_app(msg, ctx)
        except Exception as exc:  # noqa: BLE001 - mirrors Flower: any ClientApp exception becomes an error reply
            return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc)}:<'{exc}'>"), reply_to=msg)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node now; keep the reply for ``pull_messages``."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            reply = self._call(msg)
            if self._record:
                self.log.append(Exchange(msg.metadata.dst_node_id, msg.metadata.message_type, msg, reply))
            if reply is not None:
                self._pending[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies that arrived for ``message_ids``."""
        return [self._pending.pop(i) for i in message_ids if i in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull (synchronous: every reply is there or never comes)."""
        return self.pull_messages(list(self.push_messages(messages)))


def run_in_process(
    run_config: Mapping[str, Any],
    *,
    num_nodes: int,
    node_configs: Sequence[Mapping[str, Any]] | None = None,
    client_app: ClientAppFn | None = None,
    record: bool = False,
) -> InProcessGrid:
    """Run the ServerApp against ``num_nodes`` in-process ClientApps; return the grid (with ``record``, its log holds
    every exchange)."""
    client = client_app or load_component(component_ref("clientapp"))
    server = load_component(component_ref("serverapp"))
    grid = InProcessGrid(client, num_nodes=num_nodes, run_config=run_config, node_configs=node_configs, record=record)
    with task_identity():
        server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)))
    return grid


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` strings -> run-config dict; values are read as TOML (``true``, ``3``, ``0.5``) or else kept as
    text."""
    from shared.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            msg = f"expected KEY=VALUE, got {item!r} (e.g. --set vae-local-steps=200)"
            raise ConfigError(msg)
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out


def count_sites(path: Path, *, site_key: str, num_sites: int) -> int:
    """Simulated sites in ``path``: the distinct values of obs[site_key], or ``num_sites`` when that column is
    absent."""
    import anndata as ad

    from shared.errors import SiteDataError

    if not path.is_file():
        msg = f"no such file: {path}; pass the .h5ad to simulate: scdd simulate FILE"
        raise SiteDataError(msg)
    obs = ad.read_h5ad(path, backed="r").obs
    if site_key and site_key in obs:
        return int(obs[site_key].astype(str).nunique())
    return num_sites


def simulate_file(data: Path, *, out: Path, overrides: Mapping[str, Any]) -> Path:
    """Simulate a federation over one file's sites in this process; return the run directory (``out``)."""
    from server.config import FederationConfig

    out = Path(out).expanduser().resolve()
    data = Path(data).expanduser().resolve()
    run_config = {
        **app_config_defaults(),
        "sim-data-path": str(data),
        "out-dir": str(out.parent),
        "run-id": out.name,
        **overrides,
    }
    cfg = FederationConfig.from_run_config(run_config)
    n = count_sites(data, site_key=cfg.sim_site_key, num_sites=cfg.sim_num_sites)
    logger.info("simulating %d sites in-process from %s", n, data)
    run_in_process(run_config, num_nodes=n)
    return cfg.run_dir("simulate")
