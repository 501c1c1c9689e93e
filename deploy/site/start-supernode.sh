#!/usr/bin/env bash
# Start a fedscdd SuperNode at a site (hospital) for Flower 1.42.
# It connects OUT to the coordinator's SuperLink over HTTPS (no inbound port is needed),
# verifies the SuperLink with the federation's CA certificate, and authenticates itself with
# the site's private key (whose public key the coordinator registered).
#
# Environment variables (defaults in parentheses):
#   FEDSCDD_SUPERLINK        host:port of the SuperLink, e.g. coordinator.example.org:8000 (required)
#                            the host must be one of the SANs of the coordinator's server.pem
#   FEDSCDD_SITE_NAME        this site's name, e.g. hospital-a                           (required)
#   FEDSCDD_DATA_PATH        ABSOLUTE path of this site's .h5ad file                      (required)
#   FEDSCDD_ROOT_CERT        the federation CA certificate     (/etc/fedscdd/ca.crt)
#   FEDSCDD_SITE_KEY         this site's private key (OpenSSH) (/etc/fedscdd/$FEDSCDD_SITE_NAME)
#   FEDSCDD_SUPERNODE_PORT   local Runtime API port (9094; distinct per SuperNode on one host)
#   FEDSCDD_CACHE_DIR        the site's private cache (prepared data, members of each run's codes; never sent)
#                            (/var/lib/fedscdd/cache)
#   FEDSCDD_NODE_CONFIG_EXTRA  more node-config pairs in TOML form, appended verbatim (empty)
#   FLOWER_SUPERNODE         the executable                    (flower-supernode)
#   FLWR_HOME                Flower's home for this process    (/var/lib/fedscdd/supernode)
# Extra arguments are passed to flower-supernode unchanged.
set -euo pipefail

die() { echo "start-supernode.sh: error: $*" >&2; exit 1; }
note() { echo "start-supernode.sh: $*" >&2; }

superlink="${FEDSCDD_SUPERLINK:-}"
site_name="${FEDSCDD_SITE_NAME:-}"
data_path="${FEDSCDD_DATA_PATH:-}"
root_cert="${FEDSCDD_ROOT_CERT:-/etc/fedscdd/ca.crt}"
site_key="${FEDSCDD_SITE_KEY:-/etc/fedscdd/$site_name}"
port="${FEDSCDD_SUPERNODE_PORT:-9094}"
cache_dir="${FEDSCDD_CACHE_DIR:-/var/lib/fedscdd/cache}"
extra_config="${FEDSCDD_NODE_CONFIG_EXTRA:-}"
supernode_bin="${FLOWER_SUPERNODE:-flower-supernode}"

export FLWR_HOME="${FLWR_HOME:-/var/lib/fedscdd/supernode}"
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

[[ -n "$superlink" ]] || die "set FEDSCDD_SUPERLINK=host:port (e.g. coordinator.example.org:8000)"
[[ "$superlink" != *"://"* ]] || die "FEDSCDD_SUPERLINK is host:port without a scheme, got '$superlink'"
[[ -n "$site_name" ]] || die "set FEDSCDD_SITE_NAME (e.g. hospital-a)"
[[ "$site_name" =~ ^[A-Za-z0-9][A-Za-z0-9_-]*$ ]] \
    || die "FEDSCDD_SITE_NAME must match [A-Za-z0-9][A-Za-z0-9_-]*, got '$site_name'"
[[ -n "$data_path" ]] || die "set FEDSCDD_DATA_PATH to the absolute path of this site's .h5ad"
[[ "$data_path" == /* ]] || die "FEDSCDD_DATA_PATH must be absolute, got '$data_path'"
[[ -r "$data_path" ]] || die "cannot read FEDSCDD_DATA_PATH '$data_path'"
# The values go into TOML basic strings ("..."): refuse characters that would need escaping.
case "$data_path$site_name$cache_dir" in
    *'"'*|*\\*|*$'\n'*) die "FEDSCDD_DATA_PATH and FEDSCDD_CACHE_DIR must not contain '\"', '\\' or newlines";;
esac
[[ "$cache_dir" == /* ]] || die "FEDSCDD_CACHE_DIR must be absolute, got '$cache_dir'"
[[ "$port" =~ ^[0-9]+$ ]] || die "FEDSCDD_SUPERNODE_PORT must be a number, got '$port'"
command -v "$supernode_bin" >/dev/null 2>&1 \
    || die "'$supernode_bin' not found; activate the fedscdd environment or set FLOWER_SUPERNODE"
[[ -r "$root_cert" ]] || die "cannot read the CA certificate '$root_cert' (FEDSCDD_ROOT_CERT)"
[[ -r "$site_key" ]] || die "cannot read the site private key '$site_key' (FEDSCDD_SITE_KEY)"
if [[ -n "$(find "$site_key" -perm /077 2>/dev/null)" ]]; then
    note "WARNING: '$site_key' is readable by group/others; run: chmod 600 '$site_key'"
fi

mkdir -p "$FLWR_HOME" "$cache_dir" || die "cannot create '$FLWR_HOME' or '$cache_dir': run as the service user that owns /var/lib/fedscdd, or set FLWR_HOME and FEDSCDD_CACHE_DIR"
chmod 700 "$FLWR_HOME" "$cache_dir" 2>/dev/null || true

# TOML values: strings are quoted, e.g. data-path="/abs/site.h5ad" site-name="hospital-a"
node_config="data-path=\"$data_path\" site-name=\"$site_name\" cache-dir=\"$cache_dir\""
if [[ -n "$extra_config" ]]; then
    node_config="$node_config $extra_config"
fi

note "starting $supernode_bin for site '$site_name' -> https://$superlink"
exec "$supernode_bin" \
    --superlink "$superlink" \
    --root-certificates "$root_cert" \
    --auth-supernode-private-key "$site_key" \
    --port "$port" \
    --node-config "$node_config" \
    "$@"
