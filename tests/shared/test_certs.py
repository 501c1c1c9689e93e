"""Tests of server/pki/certs.py: CA, SuperLink certificate, site keys, no-overwrite, real TLS."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID

from server.pki import certs
from server.pki import cli as certs_cli
from server.pki.certs import CertificateError
from shared.errors import FedscddError

SANS = ["127.0.0.1", "coordinator.example.org", "::1"]
SITES = ["hospital-a", "hospital_b", "Site3"]
TIMEOUT_S = 10.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("pki") / "certs"
    return certs.generate_all(out, sans=SANS, site_names=SITES)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> certs.CertPaths:
    return certs.create_ca(tmp_path_factory.mktemp("other") / "ca", common_name="someone-else")


# --------------------------------------------------------------------------- layout / CA


def test_generate_all_layout(pki: dict) -> None:
    out: Path = pki["out_dir"]
    assert pki["ca"] == certs.CertPaths(out / "ca.crt", out / "ca.key")
    assert pki["server"] == certs.CertPaths(out / "server.pem", out / "server.key")
    assert [s.site_name for s in pki["sites"]] == SITES
    for site in pki["sites"]:
        assert site.private_key == out / "sites" / site.site_name
        assert site.public_key == out / "sites" / f"{site.site_name}.pub"
    expected = {"ca.crt", "ca.key", "server.pem", "server.key", "sites"}
    assert {p.name for p in out.iterdir()} == expected
    assert {p.name for p in (out / "sites").iterdir()} == {n for s in SITES for n in (s, f"{s}.pub")}


def test_ca_is_a_ca(pki: dict) -> None:
    ca = _load_cert(pki["ca"].cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is True
    ca.verify_directly_issued_by(ca)  # self-signed
    key = load_pem_private_key(pki["ca"].key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == ca.public_key()


# --------------------------------------------------------------------------- server cert


def test_server_cert_verifies_against_ca(pki: dict, other_ca: certs.CertPaths) -> None:
    ca = _load_cert(pki["ca"].cert)
    server = _load_cert(pki["server"].cert)
    server.verify_directly_issued_by(ca)
    with pytest.raises((ValueError, InvalidSignature)):  # signature does not match another CA
        server.verify_directly_issued_by(_load_cert(other_ca.cert))
    assert server.not_valid_after_utc <= ca.not_valid_after_utc


def test_server_cert_sans_and_usages(pki: dict) -> None:
    server = _load_cert(pki["server"].cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.example.org"]
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert server.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    key = load_pem_private_key(pki["server"].key.read_bytes(), password=None)
    assert key.public_key() == server.public_key()


def test_san_parsing() -> None:
    assert certs.parse_san("10.1.2.3") == x509.IPAddress(ipaddress.ip_address("10.1.2.3"))
    assert certs.parse_san("[fd00::1]") == x509.IPAddress(ipaddress.ip_address("fd00::1"))
    assert certs.parse_san("Coordinator.Example.org.") == x509.DNSName("coordinator.example.org")
    assert certs.parse_san("*.example.org") == x509.DNSName("*.example.org")
    for bad in [
        "",
        "  ",
        "https://coordinator.example.org",
        "host:8000",
        "a..b",
        "-x.org",
        "999.1.1.1",
        "bad_name.org",
        "über.example.org",
    ]:
        with pytest.raises(CertificateError):
            certs.parse_san(bad)


def test_no_san_refused(tmp_path: Path) -> None:
    ca = certs.create_ca(tmp_path)
    with pytest.raises(CertificateError, match="at least one SAN"):
        certs.create_server_cert(tmp_path, ca_dir=tmp_path, sans=[])
    with pytest.raises(CertificateError, match="at least one SAN"):
        certs.generate_all(tmp_path / "all", sans=[], site_names=["a"])
    assert not (tmp_path / "server.pem").exists()
    assert not (tmp_path / "all").exists()
    assert ca.cert.exists()


def test_server_cert_needs_a_ca(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match=r"ca\.crt not found"):
        certs.create_server_cert(tmp_path / "out", ca_dir=tmp_path, sans=["127.0.0.1"])
    assert not (tmp_path / "out").exists()


def test_separate_dirs(tmp_path: Path) -> None:
    ca = certs.create_ca(tmp_path / "ca", days=30)
    server = certs.create_server_cert(tmp_path / "server", ca_dir=tmp_path / "ca", sans=["localhost"], days=3650)
    cert = _load_cert(server.cert)
    cert.verify_directly_issued_by(_load_cert(ca.cert))
    # clamped to the CA's lifetime
    assert cert.not_valid_after_utc <= _load_cert(ca.cert).not_valid_after_utc


def test_bad_days_refused(tmp_path: Path) -> None:
    for days in (0, -1, 1.5, True):
        with pytest.raises(CertificateError, match="days"):
            certs.create_ca(tmp_path, days=days)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- site keys


def test_site_keys_load_and_match(pki: dict) -> None:
    for site in pki["sites"]:
        private = load_ssh_private_key(site.private_key.read_bytes(), password=None)
        public = load_ssh_public_key(site.public_key.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert private.public_key() == public
        assert site.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        line = site.public_key.read_text()
        assert line.startswith("ecdsa-sha2-nistp384 ") and line.count("\n") == 1


def test_site_keys_distinct(pki: dict) -> None:
    publics = {s.public_key.read_bytes().split()[1] for s in pki["sites"]}
    assert len(publics) == len(SITES)


def test_site_keys_accepted_by_flower(pki: dict) -> None:
    """The loaders `flwr supernode register` and `flower-supernode` use accept our keys."""
    register = pytest.importorskip("flwr.cli.supernode.register")
    site = pki["sites"][0]
    assert register.try_load_public_key(site.public_key)  # exits on invalid keys
    # flower-supernode: load_ssh_private_key + isinstance EllipticCurvePrivateKey (see above)


@pytest.mark.parametrize("bad", ["", "../evil", "a/b", "a b", "a.pub", "-rf", "é", "x" * 65, ".hidden"])
def test_bad_site_names_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(CertificateError, match="invalid site name"):
        certs.create_site_keys(tmp_path, site_names=["ok", bad])
    assert list(tmp_path.iterdir()) == []  # validated before anything is written


def test_duplicate_site_names_refused(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="duplicate"):
        certs.create_site_keys(tmp_path, site_names=["site-a", "SITE-A"])
    assert list(tmp_path.iterdir()) == []


def test_single_string_is_one_site(tmp_path: Path) -> None:
    (site,) = certs.create_site_keys(tmp_path, site_names="hospital-z")
    assert site.private_key.name == "hospital-z"


# --------------------------------------------------------------------------- permissions


def test_permissions(pki: dict) -> None:
    out: Path = pki["out_dir"]
    private = [pki["ca"].key, pki["server"].key] + [s.private_key for s in pki["sites"]]
    public = [pki["ca"].cert, pki["server"].cert] + [s.public_key for s in pki["sites"]]
    assert {_mode(p) for p in private} == {0o600}
    assert {_mode(p) for p in public} == {0o644}
    assert _mode(out) == 0o700
    assert _mode(out / "sites") == 0o700


def test_permissions_ignore_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0o077)
    try:
        ca = certs.create_ca(tmp_path / "x")
    finally:
        os.umask(old)
    assert _mode(ca.cert) == 0o644
    assert _mode(ca.key) == 0o600


# --------------------------------------------------------------------------- no overwrite


def test_refuses_to_overwrite_ca(tmp_path: Path) -> None:
    (tmp_path / "ca.key").write_bytes(b"precious key\n")
    with pytest.raises(CertificateError) as info:
        certs.create_ca(tmp_path)
    assert "ca.key" in str(info.value) and "will not overwrite" in str(info.value)
    assert isinstance(info.value, FedscddError)
    assert (tmp_path / "ca.key").read_bytes() == b"precious key\n"
    assert not (tmp_path / "ca.crt").exists()


def test_refuses_to_overwrite_any_file(tmp_path: Path) -> None:
    first = certs.generate_all(tmp_path / "c", sans=["127.0.0.1"], site_names=["a", "b"])
    files = sorted(p for p in (tmp_path / "c").rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    with pytest.raises(CertificateError, match="will not overwrite"):
        certs.generate_all(tmp_path / "c", sans=["127.0.0.1"], site_names=["a", "b"])
    with pytest.raises(CertificateError, match=r"server\.pem"):
        certs.create_server_cert(tmp_path / "c", ca_dir=tmp_path / "c", sans=["127.0.0.1"])
    with pytest.raises(CertificateError, match="will not overwrite"):
        certs.create_site_keys(tmp_path / "c" / "sites", site_names=["b"])
    assert {p: p.read_bytes() for p in files} == before
    assert sorted(p for p in (tmp_path / "c").rglob("*") if p.is_file()) == files
    assert first["sites"][1].private_key.read_bytes() == before[first["sites"][1].private_key]


def test_existing_site_file_blocks_everything(tmp_path: Path) -> None:
    sites = tmp_path / "c" / "sites"
    sites.mkdir(parents=True)
    (sites / "b.pub").write_text("keep me\n")
    with pytest.raises(CertificateError, match=r"b\.pub"):
        certs.generate_all(tmp_path / "c", sans=["127.0.0.1"], site_names=["a", "b"])
    assert sorted(p.name for p in (tmp_path / "c").rglob("*")) == ["b.pub", "sites"]
    assert (sites / "b.pub").read_text() == "keep me\n"


def test_existing_symlink_refused(tmp_path: Path) -> None:
    (tmp_path / "site-a").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CertificateError, match="site-a"):
        certs.create_site_keys(tmp_path, site_names=["site-a"])
    assert not (tmp_path / "nowhere").exists()


# --------------------------------------------------------------------------- CLI


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    argv = [
        "--out",
        str(out),
        "--san",
        "127.0.0.1",
        "--san",
        "coordinator.example.org",
        "--site",
        "hospital-a",
        "--site",
        "hospital-b",
    ]
    assert certs_cli.main(argv) == 0
    text = capsys.readouterr().out
    for name in ["ca.crt", "ca.key", "server.pem", "server.key", "hospital-a.pub"]:
        assert name in text
    assert "flwr supernode register" in text and "--name hospital-b" in text
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert len(before) == 8

    assert certs_cli.main(argv) == 1
    assert "will not overwrite" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    assert certs_cli.main(["--out", str(out), "--sites-only", "--site", "hospital-c"]) == 0
    assert (out / "sites" / "hospital-c").exists()
    assert certs_cli.main(["--out", str(out / "x"), "--site", "a"]) == 1  # no --san
    assert "at least one SAN" in capsys.readouterr().err
    assert certs_cli.main(["--out", str(out / "y"), "--san", "h", "--site", "../a"]) == 1
    assert not (out / "x").exists() and not (out / "y").exists()

    renewed = tmp_path / "renewed"
    argv = ["--out", str(renewed), "--server-only", "--ca-dir", str(out), "--san", "10.0.0.5"]
    assert certs_cli.main(argv) == 0
    new_cert = _load_cert(renewed / "server.pem")
    new_cert.verify_directly_issued_by(_load_cert(out / "ca.crt"))
    assert sorted(p.name for p in renewed.iterdir()) == ["server.key", "server.pem"]
    assert certs_cli.main(argv) == 1  # no overwrite
    assert certs_cli.main(["--out", str(tmp_path / "z"), "--server-only", "--san", "h"]) == 1
    assert "ca.crt not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- real TLS


def _tls_handshake(pki: dict, cafile: Path, server_hostname: str) -> tuple[bytes | None, BaseException | None]:
    """Serve one TLS connection with server.pem/server.key; connect as a client."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki["server"].cert, pki["server"].key)
    server_error: list[BaseException] = []

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.settimeout(TIMEOUT_S)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(TIMEOUT_S)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"hello from superlink")
        except (OSError, ssl.SSLError) as err:  # handshake refused by the client
            server_error.append(err)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    client_ctx.verify_flags |= getattr(ssl, "VERIFY_X509_STRICT", 0)
    received: bytes | None = None
    client_error: BaseException | None = None
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            received = tls.recv(100)
    except (OSError, ssl.SSLError) as err:
        client_error = err
    finally:
        thread.join(TIMEOUT_S)
        listener.close()
    assert not thread.is_alive(), "TLS server thread did not finish"
    return received, client_error


def test_tls_handshake_with_ca(pki: dict) -> None:
    received, error = _tls_handshake(pki, pki["ca"].cert, "127.0.0.1")
    assert error is None and received == b"hello from superlink"
    received, error = _tls_handshake(pki, pki["ca"].cert, "coordinator.example.org")
    assert error is None and received == b"hello from superlink"


def test_tls_handshake_fails_with_other_ca(pki: dict, other_ca: certs.CertPaths) -> None:
    received, error = _tls_handshake(pki, other_ca.cert, "127.0.0.1")
    assert received is None
    assert isinstance(error, ssl.SSLCertVerificationError)


def test_tls_handshake_fails_for_name_not_in_sans(pki: dict) -> None:
    received, error = _tls_handshake(pki, pki["ca"].cert, "other.example.org")
    assert received is None
    assert isinstance(error, ssl.SSLCertVerificationError)
