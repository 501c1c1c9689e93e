#!/usr/bin/env bash
# Register every site public key (*.pub) with the SuperLink, on the coordinator host.
#
# Usage: register-sites.sh [KEYS_DIR] [CONNECTION]
#   KEYS_DIR    directory with <site>.pub files   (default: $FEDSCDD_SITES_DIR or ./certs/sites)
#   CONNECTION  SuperLink connection name in $FLWR_HOME/config.toml
#               (default: $FEDSCDD_CONNECTION or "fedscdd"; see flwr-config.toml.example)
# The SuperNode name is the file name without ".pub". A key that is already registered is
# reported and skipped (the SuperLink refuses a public key twice). Exit status 1 if any
# registration failed. Needs the SuperLink running with --enable-supernode-auth.
set -euo pipefail

keys_dir="${1:-${FEDSCDD_SITES_DIR:-./certs/sites}}"
connection="${2:-${FEDSCDD_CONNECTION:-fedscdd}}"
flwr_bin="${FLWR_CLI:-flwr}"

export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1

command -v "$flwr_bin" >/dev/null 2>&1 || { echo "register-sites.sh: '$flwr_bin' not found" >&2; exit 1; }
[[ -d "$keys_dir" ]] || { echo "register-sites.sh: no directory '$keys_dir'" >&2; exit 1; }

shopt -s nullglob
pubs=("$keys_dir"/*.pub)
if (( ${#pubs[@]} == 0 )); then
    echo "register-sites.sh: no *.pub files in '$keys_dir'" >&2
    exit 1
fi

failed=()
for pub in "${pubs[@]}"; do
    name="$(basename -- "$pub" .pub)"
    echo "== registering $name ($pub) on connection '$connection'"
    if "$flwr_bin" supernode register "$pub" "$connection" --name "$name"; then
        :
    else
        echo "   -> FAILED for $name (already registered? check: $flwr_bin supernode list $connection)" >&2
        failed+=("$name")
    fi
done

echo "== SuperNodes known to the SuperLink:"
"$flwr_bin" supernode list "$connection" || true

if (( ${#failed[@]} > 0 )); then
    echo "register-sites.sh: not registered: ${failed[*]}" >&2
    exit 1
fi
