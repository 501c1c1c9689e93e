#!/usr/bin/env bash
# Start the fedscdd SuperLink (coordinator) for Flower 1.42:
#   HTTPS on ONE port (Fleet API for the sites + Control API for `flwr` + Runtime API),
#   SuperNode authentication (only registered site keys may connect),
#   persistent state (registrations and run history survive a restart),
#   no runtime `uv sync` of app dependencies (they are preinstalled in this environment).
#
# Every setting comes from an environment variable with a default:
#   FEDSCDD_CERT_DIR          directory with ca.crt, server.pem, server.key  (/etc/fedscdd/certs)
#   FEDSCDD_SSL_CA_CERTFILE   CA certificate              ($FEDSCDD_CERT_DIR/ca.crt)
#   FEDSCDD_SSL_CERTFILE      SuperLink certificate       ($FEDSCDD_CERT_DIR/server.pem)
#   FEDSCDD_SSL_KEYFILE       SuperLink private key       ($FEDSCDD_CERT_DIR/server.key)
#   FEDSCDD_STATE_DIR         state directory             (/var/lib/fedscdd)
#   FEDSCDD_DATABASE          SQLite state file           ($FEDSCDD_STATE_DIR/superlink.db)
#   FEDSCDD_OUT_DIR           where runs write their outputs when the run config sets no out-dir:
#                             one folder run-<run id>/ per run, with run.log  ($FEDSCDD_STATE_DIR/runs)
#   FEDSCDD_SUPERLINK_HOST    interface to listen on      (127.0.0.1 -- set the PRIVATE IP the
#                             sites reach; 0.0.0.0 only inside a container whose published port
#                             is bound to a private IP / firewalled to the sites)
#   FEDSCDD_SUPERLINK_PORT    port                        (8000)
#   FEDSCDD_SUPERLINK_LOG_FILE  optional log file (rotated by Flower)
#   FLOWER_SUPERLINK          the executable              (flower-superlink)
#   FLWR_HOME                 Flower's home for this process ($FEDSCDD_STATE_DIR/flwr-home)
# Extra arguments are passed to flower-superlink unchanged.
set -euo pipefail

die() { echo "start-superlink.sh: error: $*" >&2; exit 1; }
note() { echo "start-superlink.sh: $*" >&2; }

cert_dir="${FEDSCDD_CERT_DIR:-/etc/fedscdd/certs}"
ca_cert="${FEDSCDD_SSL_CA_CERTFILE:-$cert_dir/ca.crt}"
server_cert="${FEDSCDD_SSL_CERTFILE:-$cert_dir/server.pem}"
server_key="${FEDSCDD_SSL_KEYFILE:-$cert_dir/server.key}"
state_dir="${FEDSCDD_STATE_DIR:-/var/lib/fedscdd}"
database="${FEDSCDD_DATABASE:-$state_dir/superlink.db}"
out_dir="${FEDSCDD_OUT_DIR:-$state_dir/runs}"
host="${FEDSCDD_SUPERLINK_HOST:-127.0.0.1}"
port="${FEDSCDD_SUPERLINK_PORT:-8000}"
log_file="${FEDSCDD_SUPERLINK_LOG_FILE:-}"
superlink_bin="${FLOWER_SUPERLINK:-flower-superlink}"

export FLWR_HOME="${FLWR_HOME:-$state_dir/flwr-home}"
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

command -v "$superlink_bin" >/dev/null 2>&1 \
    || die "'$superlink_bin' not found; activate the fedscdd environment or set FLOWER_SUPERLINK"
for f in "$ca_cert" "$server_cert" "$server_key"; do
    [[ -r "$f" ]] || die "cannot read '$f' (create it with: scdd certs --out DIR --san ADDR ...)"
done
if [[ -n "$(find "$server_key" -perm /077 2>/dev/null)" ]]; then
    note "WARNING: '$server_key' is readable by group/others; run: chmod 600 '$server_key'"
fi
[[ "$port" =~ ^[0-9]+$ ]] || die "FEDSCDD_SUPERLINK_PORT must be a number, got '$port'"

[[ "$out_dir" == /* ]] || die "FEDSCDD_OUT_DIR must be an absolute path, got '$out_dir'"
mkdir -p "$(dirname -- "$database")" "$FLWR_HOME" "$out_dir"
chmod 700 "$FLWR_HOME" 2>/dev/null || true
[[ -w "$out_dir" ]] || die "cannot write to FEDSCDD_OUT_DIR '$out_dir' (run outputs go there): fix its owner or set another"
# Inherited by the SuperExec and every ServerApp it starts (server/config.py reads it when out-dir is not set).
export FEDSCDD_OUT_DIR="$out_dir"

case "$host" in
    127.0.0.1|localhost|::1)
        note "listening on $host only: sites on other machines cannot connect" \
             "(set FEDSCDD_SUPERLINK_HOST to the coordinator's private IP)";;
    0.0.0.0|::)
        note "WARNING: listening on ALL interfaces. The Control API (start runs, register" \
             "keys, read logs) has no login in Flower 1.42 and shares this port: bind a" \
             "private IP or firewall port $port to the sites' IPs (see deploy/README.md).";;
esac

# The SuperLink's own SuperExec (which starts the ServerApp) connects back to https://HOST:PORT,
# with 0.0.0.0 replaced by 127.0.0.1 and :: by ::1, and verifies server.pem against ca.crt:
# that address must be one of the certificate's SANs, or runs cannot start.
case "$host" in
    0.0.0.0) runtime_host=127.0.0.1;;
    ::) runtime_host=::1;;
    *) runtime_host="$host";;
esac
if command -v openssl >/dev/null 2>&1; then
    if [[ "$runtime_host" =~ ^[0-9.]+$ || "$runtime_host" == *:* ]]; then
        check=(-checkip "$runtime_host")
    else
        check=(-checkhost "$runtime_host")
    fi
    if ! openssl x509 -in "$server_cert" -noout "${check[@]}" 2>/dev/null | grep -q "does match"; then
        note "WARNING: '$server_cert' has no SAN for '$runtime_host', the address the SuperLink's" \
             "SuperExec uses to reach it; ServerApps will fail the TLS check. Re-issue it with" \
             "--san $runtime_host (plus the address the sites use)."
    fi
fi

args=(
    --ssl-ca-certfile "$ca_cert"
    --ssl-certfile "$server_cert"
    --ssl-keyfile "$server_key"
    --enable-supernode-auth
    --database "$database"
    --host "$host"
    --port "$port"
)
# The flag exists in Flower 1.42; the environment variable above covers versions without it.
if "$superlink_bin" --help 2>/dev/null | grep -q -- '--disable-runtime-dependency-installation'; then
    args+=(--disable-runtime-dependency-installation)
fi
if [[ -n "$log_file" ]]; then
    args+=(--log-file "$log_file")
fi

note "starting $superlink_bin on https://$host:$port (state: $database)"
note "run outputs: $out_dir/run-<run id>/ (progress in run.log there) unless a run sets out-dir"
exec "$superlink_bin" "${args[@]}" "$@"
