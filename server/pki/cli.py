"""`scdd certs`: the command line over `server.pki.certs` (CLI code, so it prints for the operator)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from server.cli.flags import Parser, exit_code, int_arg, one_line, out_dir
from server.pki.certs import (
    DEFAULT_DAYS,
    SITES_DIR_NAME,
    CertificateError,
    CertPaths,
    SiteKeyPaths,
    create_server_cert,
    create_site_keys,
    generate_all,
    parse_san,
)

logger = logging.getLogger(__name__)

EXAMPLES = """examples:
  scdd certs --out runs/certs --san 10.0.0.5 --san 127.0.0.1 --site hospital-a --site hospital-b
  scdd certs --out runs/certs --sites-only --site hospital-c"""

# --------------------------------------------------------------------------- CLI


def _out_dir(text: str) -> Path:
    return Path(out_dir(text))


def build_parser() -> argparse.ArgumentParser:
    """The `scdd certs` parser: scdd's error format (one line, exit 2) and defaults from server.pki.certs."""
    parser = Parser(
        prog="scdd certs",
        description=(
            "Create the TLS CA, the SuperLink certificate and one SuperNode-authentication "
            "key pair per site. Never overwrites existing files."
        ),
        epilog=EXAMPLES,
    )
    parser.add_argument("--out", required=True, type=_out_dir, help="output directory")
    parser.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="ADDR",
        help="IP address or DNS name the sites use to reach the SuperLink (repeatable). "
        "Also add 127.0.0.1: the SuperLink's own SuperExec connects to 127.0.0.1 when it "
        "listens on 0.0.0.0 (containers), and `flwr` on the coordinator host may use it",
    )
    parser.add_argument(
        "--site",
        action="append",
        default=[],
        metavar="NAME",
        help="site name, [A-Za-z0-9_-]+ (repeatable); becomes OUT/sites/NAME(.pub)",
    )
    parser.add_argument("--days", type=int_arg(1), help=f"validity in days (default: {DEFAULT_DAYS})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--sites-only",
        action="store_true",
        help="only create keys for the given --site names in OUT/sites "
        "(to add a hospital later; CA and server certificate are left alone)",
    )
    mode.add_argument(
        "--server-only",
        action="store_true",
        help="only issue a new server.pem/server.key in OUT, signed by the CA in --ca-dir "
        "(to renew the certificate or change SANs; OUT must not hold a server.pem yet)",
    )
    parser.add_argument(
        "--ca-dir",
        type=Path,  # checked by server.pki.certs (ca.crt and ca.key in it), in one line
        default=None,
        help="directory with ca.crt and ca.key for --server-only (without it: the --out directory)",
    )
    return parser


def _describe(path: Path) -> str:
    return f"{path}  ({oct(path.stat().st_mode & 0o777)})"


def _print_sites_next_steps(sites: list[SiteKeyPaths], out: Path) -> None:
    if not sites:
        return
    print("\nPer site (send over a secure channel, each site gets ONLY its own private key):")
    for site in sites:
        print(f"  {site.site_name}: {site.private_key}  -> that site only (keep mode 0600)")
    print("\nOn the coordinator, register each public key (see deploy/README.md):")
    for site in sites:
        print(f"  flwr supernode register {site.public_key} <connection> --name {site.site_name}")
    print(f"  (or: deploy/coordinator/register-sites.sh {out} <connection>)")


def main(argv: list[str] | None = None) -> int:
    """``scdd certs``: create certificates/keys and print where each file goes; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a refused value (its line already printed)
        return exit_code(exc)
    out: Path = args.out.expanduser().absolute()
    days = {} if args.days is None else {"days": args.days}  # None: server.pki.certs' default
    try:
        if args.server_only:
            ca_dir = (args.ca_dir or out).expanduser().absolute()
            server = create_server_cert(out, ca_dir=ca_dir, sans=args.san, **days)
            print("Wrote:")
            for path in (server.cert, server.key):
                print("  " + _describe(path))
            print("\nCopy both to the coordinator (--ssl-certfile / --ssl-keyfile) and restart the")
            print("SuperLink. Sites keep their ca.crt; nothing changes for them.")
            return 0
        if args.ca_dir is not None:
            raise CertificateError("--ca-dir is only used with --server-only")
        if args.sites_only:
            if not args.site:
                raise CertificateError("--sites-only needs at least one --site NAME")
            sites = create_site_keys(out / SITES_DIR_NAME, site_names=args.site)
            written = [p for s in sites for p in (s.private_key, s.public_key)]
            print("Wrote:")
            for path in written:
                print("  " + _describe(path))
            _print_sites_next_steps(sites, out / SITES_DIR_NAME)
            return 0
        result = generate_all(out, sans=args.san, site_names=args.site, **days)
    except CertificateError as err:
        print(f"scdd certs: error: {one_line(str(err))}", file=sys.stderr)
        return 1

    ca: CertPaths = result["ca"]
    server = result["server"]  # CertPaths (the name's first use is the --server-only branch's)
    sites = result["sites"]  # list[SiteKeyPaths]
    print("Wrote:")
    for path in [ca.cert, ca.key, server.cert, server.key] + [p for s in sites for p in (s.private_key, s.public_key)]:
        print("  " + _describe(path))
    print("\nWhere each file goes:")
    print(f"  {ca.cert}: to the coordinator AND every site (public; --root-certificates,")
    print("      root-certificates in the flwr connection, --ssl-ca-certfile)")
    print(f"  {server.cert}, {server.key}: coordinator only (--ssl-certfile / --ssl-keyfile)")
    print(f"  {ca.key}: nobody; move it offline, it is only needed to re-issue server.pem")
    loopback = {"127.0.0.1", "::1", "localhost"}
    if not any(str(parse_san(s).value) in loopback for s in args.san):
        print(
            "\nNote: no 127.0.0.1 SAN. The SuperLink's own SuperExec connects to the address in"
            "\n  --host (127.0.0.1 when --host is 0.0.0.0, e.g. in a container); that address"
            "\n  must be a SAN. Add --san 127.0.0.1 unless --host is one of the SANs above."
        )
    _print_sites_next_steps(sites, out / SITES_DIR_NAME)
    if not sites:
        print("\nNo --site given; add sites later with: scdd certs --out DIR --sites-only --site NAME")
    print("\nNext: follow deploy/README.md (start-superlink.sh, register-sites.sh, start-supernode.sh).")
    return 0


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.WARNING)
    raise SystemExit(main())
