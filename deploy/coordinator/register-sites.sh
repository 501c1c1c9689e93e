#!/usr/bin/env bash
# Register every site public key (*.pub) with the SuperLink, on the coordinator host, and keep
# the name <-> node ID <-> key mapping that `flwr supernode list` does not show.
#
# Usage: register-sites.sh [KEYS_DIR] [CONNECTION]
#   KEYS_DIR    directory with <site>.pub files   (default: $FEDSCDD_SITES_DIR or ./certs/sites)
#   CONNECTION  SuperLink connection name in $FLWR_HOME/config.toml
#               (default: $FEDSCDD_CONNECTION or "fedscdd"; write it with `scdd flwr-connection`)
# Environment: FEDSCDD_REGISTRY  the mapping file (default: KEYS_DIR/registered.tsv), FLWR_CLI (flwr).
#
# The site name is the file name without ".pub". Safe to run again (e.g. from configuration
# management): a key the SuperLink already knows counts as registered and keeps its node ID in the
# mapping. The mapping file has one tab-separated line per site:
#   name  node_id  key_sha256  registered_at (UTC)
# (node_id "unknown" when the key was registered by other means than this script).
# Exit status 0 when every key is registered (newly or before), 1 if any registration failed.
# Needs the SuperLink running with --enable-supernode-auth.
set -euo pipefail

keys_dir="${1:-${FEDSCDD_SITES_DIR:-./certs/sites}}"
connection="${2:-${FEDSCDD_CONNECTION:-fedscdd}}"
registry="${FEDSCDD_REGISTRY:-$keys_dir/registered.tsv}"
flwr_bin="${FLWR_CLI:-flwr}"

export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1

die() { echo "register-sites.sh: error: $*" >&2; exit 1; }

command -v "$flwr_bin" >/dev/null 2>&1 || die "'$flwr_bin' not found; activate the fedscdd environment or set FLWR_CLI"
[[ -d "$keys_dir" ]] || die "no directory '$keys_dir' (the folder of <site>.pub files written by scdd certs)"

shopt -s nullglob
pubs=("$keys_dir"/*.pub)
(( ${#pubs[@]} > 0 )) || die "no *.pub files in '$keys_dir'"

# The key's identity: SHA-256 of the base64 key blob (the second field of an OpenSSH public key line).
fingerprint() { awk 'NR == 1 {print $2}' "$1" | sha256sum | cut -d' ' -f1; }

# The node ID the mapping already holds for a key fingerprint (empty if none).
known_id() { [[ -f "$registry" ]] && awk -F'\t' -v fp="$1" '$3 == fp {id = $2} END {print id}' "$registry" || true; }

declare -A ids=() stamps=() fps=()
failed=()
for pub in "${pubs[@]}"; do
    name="$(basename -- "$pub" .pub)"
    fp="$(fingerprint "$pub")"
    out="$("$flwr_bin" supernode register "$pub" "$connection" --name "$name" 2>&1)" && rc=0 || rc=$?
    if [[ $rc -eq 0 && "$out" =~ SuperNode\ ([0-9]+)\ registered ]]; then
        ids[$name]="${BASH_REMATCH[1]}"
        stamps[$name]="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "== $name: registered as SuperNode ${ids[$name]}"
    elif [[ "$out" == *"already in use"* ]]; then
        old="$(known_id "$fp")"
        ids[$name]="${old:-unknown}"
        stamps[$name]="$(awk -F'\t' -v fp="$fp" '$3 == fp {t = $4} END {print t}' "$registry" 2>/dev/null || true)"
        echo "== $name: already registered (SuperNode ${ids[$name]})"
    else
        echo "== $name: FAILED to register ($pub):" >&2
        printf '%s\n' "$out" | sed 's/^/   /' >&2
        failed+=("$name")
        continue
    fi
    fps[$name]="$fp"
done

# Write the mapping atomically: lines of other keys kept, this run's keys updated.
tmp="$(mktemp "$registry.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
{
    printf 'name\tnode_id\tkey_sha256\tregistered_at\n'
    if [[ -f "$registry" ]]; then
        tail -n +2 "$registry" | while IFS=$'\t' read -r n id fp t; do
            [[ -n "${ids[$n]+set}" ]] || printf '%s\t%s\t%s\t%s\n' "$n" "$id" "$fp" "$t"
        done
    fi
    for name in "${!ids[@]}"; do
        printf '%s\t%s\t%s\t%s\n' "$name" "${ids[$name]}" "${fps[$name]}" "${stamps[$name]:-unknown}"
    done | sort
} > "$tmp"
chmod 644 "$tmp"
mv -f "$tmp" "$registry"
trap - EXIT
echo "== name <-> node ID mapping: $registry"

# Names beside the node IDs and statuses the SuperLink reports.
if list="$("$flwr_bin" supernode list "$connection" --format json 2>/dev/null)"; then
    printf '%s' "$list" | python3 -c '
import json, sys
text = sys.stdin.read()
nodes = json.loads(text[text.index("{"):])["nodes"]
status = {str(n["node-id"]): n["status"] for n in nodes}
print("%-24s %-22s %s" % ("name", "node id", "status"))
for line in open(sys.argv[1], encoding="utf-8").read().splitlines()[1:]:
    name, node = line.split("\t")[:2]
    print("%-24s %-22s %s" % (name, node, status.get(node, "not listed")))
' "$registry" || true
fi

if (( ${#failed[@]} > 0 )); then
    die "not registered: ${failed[*]}"
fi
