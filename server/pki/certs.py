"""Certificates and keys for a fedscdd deployment (TLS + SuperNode authentication).

Plain functions on top of the ``cryptography`` package; no Flower import.

What is created (``generate_all`` layout)::

    OUT/ca.crt            CA certificate        -> coordinator and every site (public)
    OUT/ca.key            CA private key        -> keep offline; only needed to re-issue server.pem
    OUT/server.pem        SuperLink certificate -> coordinator (public)
    OUT/server.key        SuperLink private key -> coordinator only
    OUT/sites/<name>      site private key (OpenSSH, ECDSA P-384) -> that site only
    OUT/sites/<name>.pub  site public key (OpenSSH)              -> coordinator, for
                                                                    ``flwr supernode register``

Rules every function follows:

* never overwrite: if any target file exists, :class:`CertificateError` is raised before
  anything is written, and files are created with ``O_CREAT | O_EXCL`` so a race cannot
  clobber a file either; if a call fails half-way, the files it created are removed;
* private keys are written unencrypted with mode 0600, public files with 0644, directories
  this module creates get 0700;
* the TLS keys use ECDSA P-384 / SHA-384; site keys are ECDSA P-384 in OpenSSH format,
  which is what ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` load.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import FedscddError

__all__ = [
    "CA_CERT_NAME",
    "CA_KEY_NAME",
    "SERVER_CERT_NAME",
    "SERVER_KEY_NAME",
    "SITES_DIR_NAME",
    "CertPaths",
    "CertificateError",
    "SiteKeyPaths",
    "create_ca",
    "create_server_cert",
    "create_site_keys",
    "generate_all",
    "parse_san",
    "validate_site_name",
]

logger = logging.getLogger(__name__)

CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"
SERVER_CERT_NAME = "server.pem"
SERVER_KEY_NAME = "server.key"
SITES_DIR_NAME = "sites"

PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
DIR_MODE = 0o700

DEFAULT_DAYS = 825
_CLOCK_SKEW = _dt.timedelta(minutes=5)
_CURVE = ec.SECP384R1
_HASH = hashes.SHA384

_SITE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class CertificateError(FedscddError, ValueError):
    """A certificate/key cannot be created: bad input, missing CA, or a file already exists."""


@dataclass(frozen=True)
class CertPaths:
    """A certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class SiteKeyPaths:
    """A site's SuperNode-authentication key pair (OpenSSH format)."""

    site_name: str
    private_key: Path
    public_key: Path


# --------------------------------------------------------------------------- validation


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Digital signatures only; a CA also signs certificates and revocation lists."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def validate_site_name(name: str) -> str:
    """Return ``name`` if it is a usable site name (also used as a file name), else raise."""
    if not isinstance(name, str) or not _SITE_NAME_RE.fullmatch(name):
        raise CertificateError(
            f"invalid site name {name!r}: expected 1-64 characters from [A-Za-z0-9_-], "
            "starting with a letter or digit (it becomes the key file name), "
            "e.g. 'hospital-a'"
        )
    return name


def parse_san(value: str) -> x509.GeneralName:
    """Parse one subjectAltName: an IP address if it is one, else a DNS name."""
    if not isinstance(value, str) or not value.strip():
        raise CertificateError(
            f"invalid SAN {value!r}: expected an IP address or a DNS name, e.g. '10.0.0.5' or 'coordinator.example.org'"
        )
    text = value.strip()
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return x509.IPAddress(ipaddress.ip_address(candidate))
    except ValueError:
        pass
    hint = ""
    if "://" in text or "/" in text:
        hint = " (give the bare host name, not a URL)"
    elif ":" in text:
        hint = " (give the host without ':port')"
    name = text.rstrip(".").lower()
    labels = name.split(".")
    if labels and labels[0] == "*" and len(labels) > 2:  # wildcard, e.g. *.example.org
        labels = labels[1:]
    if not name or len(name) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise CertificateError(
            f"invalid SAN {value!r}: expected an IP address or an ASCII DNS name "
            f"such as 'coordinator.example.org'{hint}"
        )
    if all(label.isdigit() for label in labels):
        raise CertificateError(f"invalid SAN {value!r}: looks like an IP address but is not a valid one")
    return x509.DNSName(name)


def _parse_sans(sans: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(sans, str):  # a bare string would be iterated character by character
        sans = [sans]
    parsed: list[x509.GeneralName] = []
    for value in sans:
        general_name = parse_san(value)
        if general_name not in parsed:
            parsed.append(general_name)
    if not parsed:
        raise CertificateError(
            "at least one SAN is required: give every address the sites use to reach the "
            "SuperLink, e.g. --san 10.0.0.5 --san coordinator.example.org"
        )
    return parsed


def _validate_site_names(site_names: Sequence[str]) -> list[str]:
    if isinstance(site_names, str):
        site_names = [site_names]
    names = [validate_site_name(name) for name in site_names]
    seen: dict[str, str] = {}
    for name in names:
        if name.lower() in seen:
            raise CertificateError(
                f"duplicate site name {name!r} (same as {seen[name.lower()]!r} "
                "ignoring case); every site needs its own key"
            )
        seen[name.lower()] = name
    return names


def _validate_days(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise CertificateError(f"invalid validity {days!r}: expected a whole number of days >= 1")
    return days


# --------------------------------------------------------------------------- file writing


def _refuse_existing(paths: Sequence[Path]) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            raise CertificateError(
                f"{path} already exists; fedscdd will not overwrite certificates or keys. "
                "Move it away (or choose another --out directory) and run again."
            )


def _ensure_dir(path: Path) -> None:
    """Create ``path`` (and parents) if missing; a directory created here gets mode 0700."""
    if path.is_dir():
        return
    if path.exists():
        raise CertificateError(f"{path} exists and is not a directory")
    path.mkdir(parents=True, mode=DIR_MODE)
    os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask
    logger.info("created directory %s (mode 0700)", path)


def _write_new(path: Path, data: bytes, mode: int, created: list[Path]) -> None:
    """Write ``data`` to a NEW file with exactly ``mode``; never replaces an existing file."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    except FileExistsError:
        raise CertificateError(
            f"{path} already exists; fedscdd will not overwrite certificates or keys. "
            "Move it away (or choose another --out directory) and run again."
        ) from None
    created.append(path)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), mode)  # independent of the umask
        handle.write(data)
    logger.info("wrote %s (mode %s)", path, oct(mode))


def _rollback(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            path.unlink()
            logger.info("removed %s after a failure", path)
        except OSError:  # pragma: no cover - best effort
            logger.warning("could not remove %s after a failure", path)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


# --------------------------------------------------------------------------- builders


def _ca_targets(out_dir: Path) -> CertPaths:
    return CertPaths(cert=out_dir / CA_CERT_NAME, key=out_dir / CA_KEY_NAME)


def _server_targets(out_dir: Path) -> CertPaths:
    return CertPaths(cert=out_dir / SERVER_CERT_NAME, key=out_dir / SERVER_KEY_NAME)


def _site_targets(out_dir: Path, names: Sequence[str]) -> list[SiteKeyPaths]:
    return [SiteKeyPaths(site_name=n, private_key=out_dir / n, public_key=out_dir / f"{n}.pub") for n in names]


def _create_ca(out_dir: Path, common_name: str, days: int, created: list[Path]) -> CertPaths:
    if not isinstance(common_name, str) or not common_name.strip():
        raise CertificateError("the CA common name must be a non-empty string")
    targets = _ca_targets(out_dir)
    _refuse_existing([targets.cert, targets.key])
    _ensure_dir(out_dir)

    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name.strip())])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(ca=True),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, _HASH())
    )
    _write_new(targets.key, _private_pem(key), PRIVATE_FILE_MODE, created)
    _write_new(targets.cert, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_FILE_MODE, created)
    return targets


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    paths = _ca_targets(Path(ca_dir))
    for path in (paths.cert, paths.key):
        if not path.is_file():
            raise CertificateError(
                f"{path} not found: create the CA first (create_ca / scdd certs) "
                "or point ca_dir at the directory holding ca.crt and ca.key"
            )
    try:
        ca_cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        ca_key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise CertificateError(
            f"cannot load the CA from {ca_dir}: {err} (expected PEM files without a passphrase)"
        ) from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{paths.key} is not an EC private key")
    if ca_cert.public_key() != ca_key.public_key():
        raise CertificateError(f"{paths.key} does not belong to {paths.cert}")
    return ca_cert, ca_key


def _create_server_cert(
    out_dir: Path,
    ca_dir: Path,
    sans: list[x509.GeneralName],
    days: int,
    created: list[Path],
) -> CertPaths:
    targets = _server_targets(out_dir)
    _refuse_existing([targets.cert, targets.key])
    ca_cert, ca_key = _load_ca(ca_dir)
    _ensure_dir(out_dir)

    now = _now()
    not_after = now + _dt.timedelta(days=days)
    ca_not_after = ca_cert.not_valid_after_utc
    if not_after > ca_not_after:
        if not_after - ca_not_after > _dt.timedelta(days=1):
            logger.warning(
                "server certificate validity shortened to the CA's expiry (%s)",
                ca_not_after.isoformat(),
            )
        not_after = ca_not_after
    if not_after <= now:
        raise CertificateError(f"the CA in {ca_dir} has expired; create a new CA")

    first = sans[0]
    common_name = str(first.value)
    key = ec.generate_private_key(_CURVE())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, _HASH())
    )
    _write_new(targets.key, _private_pem(key), PRIVATE_FILE_MODE, created)
    _write_new(targets.cert, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_FILE_MODE, created)
    return targets


def _create_site_keys(out_dir: Path, names: list[str], created: list[Path]) -> list[SiteKeyPaths]:
    targets = _site_targets(out_dir, names)
    _refuse_existing([p for t in targets for p in (t.private_key, t.public_key)])
    _ensure_dir(out_dir)
    for target in targets:
        key = ec.generate_private_key(_CURVE())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        public_line = public + f" fedscdd-site-{target.site_name}\n".encode("ascii")
        _write_new(target.private_key, private, PRIVATE_FILE_MODE, created)
        _write_new(target.public_key, public_line, PUBLIC_FILE_MODE, created)
    return targets


# --------------------------------------------------------------------------- public API


def create_ca(out_dir: Path, *, common_name: str = "fedscdd-ca", days: int = DEFAULT_DAYS) -> CertPaths:
    """Create a self-signed CA (ECDSA P-384): ``out_dir/ca.crt`` (0644) and ``ca.key`` (0600)."""
    days = _validate_days(days)
    created: list[Path] = []
    try:
        return _create_ca(Path(out_dir), common_name, days, created)
    except BaseException:
        _rollback(created)
        raise


def create_server_cert(
    out_dir: Path,
    *,
    ca_dir: Path,
    sans: Sequence[str],
    days: int = DEFAULT_DAYS,
) -> CertPaths:
    """Create the SuperLink's TLS certificate ``server.pem`` + ``server.key``, signed by the CA.

    ``sans`` lists every address the sites and the ``flwr`` CLI use to reach the SuperLink;
    each one becomes an IP-address SAN if it parses as an IP address, else a DNS-name SAN.
    """
    days = _validate_days(days)
    parsed = _parse_sans(sans)
    created: list[Path] = []
    try:
        return _create_server_cert(Path(out_dir), Path(ca_dir), parsed, days, created)
    except BaseException:
        _rollback(created)
        raise


def create_site_keys(out_dir: Path, *, site_names: Sequence[str]) -> list[SiteKeyPaths]:
    """Create one ECDSA P-384 key pair per site: ``out_dir/<site>`` and ``out_dir/<site>.pub``.

    Private keys are unencrypted OpenSSH PEM (mode 0600), public keys one OpenSSH line (0644).
    """
    names = _validate_site_names(site_names)
    created: list[Path] = []
    try:
        return _create_site_keys(Path(out_dir), names, created)
    except BaseException:
        _rollback(created)
        raise


def generate_all(
    out_dir: Path,
    *,
    sans: Sequence[str],
    site_names: Sequence[str],
    days: int = DEFAULT_DAYS,
) -> dict:
    """Create CA, SuperLink certificate and site keys under ``out_dir``; all or nothing.

    Returns ``{"out_dir": Path, "ca": CertPaths, "server": CertPaths,
    "sites": list[SiteKeyPaths]}``.
    """
    out_dir = Path(out_dir)
    days = _validate_days(days)
    parsed = _parse_sans(sans)
    names = _validate_site_names(site_names)
    sites_dir = out_dir / SITES_DIR_NAME
    ca_t, server_t = _ca_targets(out_dir), _server_targets(out_dir)
    site_t = _site_targets(sites_dir, names)
    _refuse_existing(
        [ca_t.cert, ca_t.key, server_t.cert, server_t.key] + [p for t in site_t for p in (t.private_key, t.public_key)]
    )
    created: list[Path] = []
    try:
        ca = _create_ca(out_dir, "fedscdd-ca", days, created)
        server = _create_server_cert(out_dir, out_dir, parsed, days, created)
        sites = _create_site_keys(sites_dir, names, created) if names else []
    except BaseException:
        _rollback(created)
        raise
    return {"out_dir": out_dir, "ca": ca, "server": server, "sites": sites}
