"""Deployment tooling for operators: the `flwr` CLI connection on the coordinator, and a site's check of the app it
runs.

Both lean on Flower's own code so that they follow its formats: the connection is written with
``flwr.cli.flower_config`` (the module `flwr` itself reads ``$FLWR_HOME/config.toml`` with), and the
release's bundle is rebuilt with ``flwr.cli.build`` (the builder `flwr run` uses) before it is compared
file by file with what a SuperNode installed.
"""

from __future__ import annotations

import hashlib
import io
import re
import ssl
import tomllib
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import ConfigError, FedscddError

APP_PREFIX = "fedscdd.fedscdd."  # <publisher>.<project>. of the directories Flower installs apps into
FAB_HASH8 = 8  # Flower names an installed app after the first 8 hex digits of its FAB hash
BYTECODE = "__pycache__"  # Python writes it beside the app's sources when a SuperNode runs them
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


class BundleError(FedscddError, ValueError):
    """The app a SuperNode installed cannot be checked (no such directory, no app in it, ...)."""


def flwr_config_path() -> Path:
    """``$FLWR_HOME/config.toml`` as Flower resolves it (``~/.flwr`` without FLWR_HOME)."""
    from flwr.supercore.utils import get_flwr_home

    return Path(get_flwr_home()) / "config.toml"


def _check_connection_args(name: str, address: str, root_certificates: Path) -> Path:
    if not _NAME.match(name):
        raise ConfigError(f"connection name {name!r} must be letters, digits, '-' or '_' (e.g. fedscdd)")
    if "://" in address or not _ADDRESS.match(address) or not 0 < int(address.rsplit(":", 1)[1]) < 65536:
        raise ConfigError(
            f"address {address!r} must be HOST:PORT without a scheme, e.g. 10.0.0.5:8000 (the host a SAN of server.pem)"
        )
    ca = Path(root_certificates).expanduser().resolve()
    if not ca.is_file():
        raise ConfigError(
            f"root certificate {ca} does not exist: give the federation's ca.crt (written by `scdd certs`)"
        )
    try:
        ssl.create_default_context(cafile=str(ca))
    except ssl.SSLError as exc:
        raise ConfigError(f"{ca} is not a PEM CA certificate ({exc.reason}): give the federation's ca.crt") from None
    return ca


def _readable_config(path: Path) -> None:
    """Refuse a config.toml that `flwr` itself could not read, saying where it breaks."""
    if not path.is_file():
        return
    try:
        tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid TOML ({exc}); `flwr` cannot read it either. Fix that line, or move the "
            "file away and run this again (a fresh one is written)"
        ) from None


def write_connection(name: str, address: str, root_certificates: Path, *, make_default: bool = True) -> Path:
    """Add or replace the TLS connection ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``; the file's path.

    Other connections stay as they are. With ``make_default`` the connection becomes `flwr`'s default.
    """
    import click
    from flwr.cli.flower_config import (
        read_superlink_connection,
        set_default_superlink_connection,
        write_superlink_connection,
    )
    from flwr.cli.typing import SuperLinkConnection

    ca = _check_connection_args(name, address, root_certificates)
    path = flwr_config_path()
    _readable_config(path)
    try:
        write_superlink_connection(SuperLinkConnection(name=name, address=address, root_certificates=str(ca)))
        if make_default:
            set_default_superlink_connection(name)
        written = read_superlink_connection(name)
    except (click.ClickException, ValueError) as exc:
        message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
        raise ConfigError(f"could not write the connection into {path}: {message}") from None
    if written.address != address or written.root_certificates != str(ca):
        raise ConfigError(f"{path} does not hold the connection just written; check the file's permissions")
    return path


def superlink_health(address: str, root_certificates: Path, *, timeout: float = 3.0) -> str:
    """ "ok" when ``https://<address>/health`` answers 200 over TLS verified with the CA, else why not."""
    ctx = ssl.create_default_context(cafile=str(root_certificates))
    try:
        with urllib.request.urlopen(f"https://{address}/health", context=ctx, timeout=timeout) as resp:
            return "ok" if resp.status == 200 else f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
        return str(getattr(exc, "reason", exc))


def build_release_fab(source: Path) -> bytes:
    """The FAB `flwr run` would ship from the checkout ``source`` (the release tag, no untracked files)."""
    from flwr.cli.build import build_fab_from_disk

    source = Path(source).expanduser().resolve()
    if not (source / "pyproject.toml").is_file():
        raise BundleError(
            f"{source} is not a checkout of fedscdd (no pyproject.toml): give the release tag's source folder"
        )
    try:
        return build_fab_from_disk(source)
    except Exception as exc:  # noqa: BLE001 - flwr raises click/typer errors and ValueError for a project it cannot build
        raise BundleError(f"`flwr build` of {source} failed: {exc}") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fab_files(fab: bytes) -> dict[str, str]:
    """{relative path: sha256} of the files a FAB installs (Flower drops its .info/ manifest on install)."""
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:
        return {n: _sha256(zf.read(n)) for n in zf.namelist() if not n.endswith("/") and not n.startswith(".info/")}


def find_app_dir(path: Path, fab_hash: str) -> Path:
    """The installed app directory: ``path`` itself, or the one for ``fab_hash`` under ``path`` (an ``apps/`` or
    FLWR_HOME folder)."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise BundleError(f"{path} is not a directory: give the app folder under the SuperNode's $FLWR_HOME/apps/")
    if path.name.startswith(APP_PREFIX):
        return path
    apps = path / "apps" if (path / "apps").is_dir() else path
    candidates = sorted(p for p in apps.glob(APP_PREFIX + "*") if p.is_dir())
    for p in candidates:
        if p.name.endswith("." + fab_hash[:FAB_HASH8]):
            return p
    seen = ", ".join(p.name for p in candidates) or "none"
    raise BundleError(
        f"no app installed from this release's FAB (sha256 {fab_hash[:FAB_HASH8]}...) under {apps}; "
        f"installed apps: {seen}. The coordinator ran another version: stop the SuperNode and ask."
    )


@dataclass(frozen=True)
class BundleCheck:
    """An installed app compared with the release's FAB."""

    app_dir: Path
    fab_hash: str
    n_files: int
    missing: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    problems: tuple[str, ...] = field(default=())
    bytecode_files: int = 0  # files under __pycache__/, not compared (Python writes them when the app runs)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.extra or self.problems)

    def summary(self) -> str:
        lines = [f"app: {self.app_dir}", f"release FAB sha256: {self.fab_hash}"]
        lines += [f"PROBLEM: {p}" for p in self.problems]
        for label, names in (("changed", self.changed), ("missing", self.missing), ("not in the release", self.extra)):
            lines += [f"{label}: {n}" for n in names[:50]] + (
                [f"{label}: ... {len(names) - 50} more"] if len(names) > 50 else []
            )
        if self.ok:
            lines.append(
                f"OK: the {self.n_files} files match the release "
                f"({self.bytecode_files} bytecode-cache files not compared)."
            )
        else:
            lines.append("MISMATCH: this is not the release's code. Stop the SuperNode and ask the coordinator.")
        return "\n".join(lines)


def verify_bundle(app_path: Path, fab: bytes, *, published_hash: str = "") -> BundleCheck:
    """Compare the app a SuperNode installed (``app_path``) with the release's FAB, file by file.

    Every file of the FAB must be installed with the same bytes, and nothing else may be there except
    Python's bytecode cache. ``published_hash`` (the run's fab-hash the coordinator announced), when
    given, must be the FAB's hash too.
    """
    fab_hash = _sha256(fab)
    app_dir = find_app_dir(app_path, fab_hash)
    problems = []
    if not app_dir.name.endswith("." + fab_hash[:FAB_HASH8]):
        problems.append(
            f"{app_dir.name} was installed from another FAB than the release's (sha256 {fab_hash[:FAB_HASH8]}...)"
        )
    if published_hash and published_hash.strip().lower() != fab_hash:
        problems.append(f"the published fab-hash {published_hash.strip()} is not the release's {fab_hash}")
    expected = fab_files(fab)
    installed: dict[str, str] = {}
    bytecode = 0
    for p in sorted(app_dir.rglob("*")):
        rel = p.relative_to(app_dir)
        if BYTECODE in rel.parts:
            bytecode += p.is_file()
        elif p.is_file() or p.is_symlink():
            installed[rel.as_posix()] = (
                "symlink" if p.is_symlink() else _sha256(p.read_bytes())
            )  # Flower installs plain files
    return BundleCheck(
        app_dir=app_dir,
        fab_hash=fab_hash,
        n_files=len(expected),
        missing=tuple(sorted(set(expected) - set(installed))),
        changed=tuple(sorted(n for n in set(expected) & set(installed) if expected[n] != installed[n])),
        extra=tuple(sorted(set(installed) - set(expected))),
        problems=tuple(problems),
        bytecode_files=bytecode,
    )
