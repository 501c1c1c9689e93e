"""deploy/README.md and its scripts stay in step: every file, command and variable the guide names exists, and the
registration script's bookkeeping (idempotent, name <-> node id mapping) works against a stand-in `flwr`.

The whole guide is followed against real Flower processes in tests/integration/test_deployment.py (slow).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from server.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "deploy" / "README.md"
SCRIPTS = sorted((REPO / "deploy").rglob("*.sh"))


def test_every_file_the_guide_names_exists() -> None:
    text = GUIDE.read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:coordinator|site|systemd)/[\w./-]+)`", text)) | set(
        re.findall(r"deploy/([\w/-]+\.(?:sh|service|yml))", text)
    )
    assert named, "the guide names no deployment files"
    missing = sorted(n for n in named if not (REPO / "deploy" / n).exists())
    assert not missing, f"deploy/README.md names files that do not exist: {missing}"


def test_every_scdd_command_the_guide_uses_exists() -> None:
    text = GUIDE.read_text(encoding="utf-8")
    used = set(
        re.findall(r"(?:`|/|^\s*)scdd ([a-z][a-z-]+)", text, re.M)
    )  # in code: `scdd X`, .../bin/scdd X, a line starting scdd X
    choices = set(build_parser()._subparsers._group_actions[0].choices)
    assert {"flwr-connection", "verify-bundle", "check", "certs"} <= used
    assert used <= choices, f"the guide uses unknown scdd commands: {sorted(used - choices)}"


def test_every_variable_the_guide_names_is_read_somewhere() -> None:
    names = set(re.findall(r"\bFEDSCDD_[A-Z_]+", GUIDE.read_text(encoding="utf-8")))
    sources = "".join(
        p.read_text(encoding="utf-8")
        for p in [*SCRIPTS, *(REPO / "deploy").glob("*.yml"), REPO / "server" / "config.py"]
    )
    unread = sorted(n for n in names if n not in sources)
    assert not unread, f"the guide names variables nothing reads: {unread}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_are_executable(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script} is not executable (chmod +x)"
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr


FAKE_FLWR = r"""#!/usr/bin/env bash
# Stand-in for `flwr supernode register|list`, state in $FAKE_STATE: registers each key once, refuses it after.
set -u
state="$FAKE_STATE"
case "$1 $2" in
  "supernode register")
    key="$(awk '{print $2}' "$3")"
    if grep -qx "$key" "$state/keys" 2>/dev/null; then echo "Public key already in use." >&2; exit 1; fi
    if [[ "$3" == *broken* ]]; then echo "Unable to parse the public key" >&2; exit 1; fi
    echo "$key" >> "$state/keys"
    id=$((1000 + $(wc -l < "$state/keys")))
    echo "{\"id\": $id, \"name\": \"$6\"}" >> "$state/nodes"
    echo "✅ SuperNode $id registered successfully.";;
  "supernode list")
    printf '{"success": true, "nodes": ['
    sep=""
    while read -r line; do
      id="${line#*: }"; id="${id%%,*}"
      printf '%s{"node-id": "%s", "status": "registered"}' "$sep" "$id"; sep=", "
    done < "$state/nodes"
    printf ']}\n';;
  *) echo "unexpected: $*" >&2; exit 2;;
esac
"""


@pytest.fixture
def fake_flwr(tmp_path: Path) -> dict[str, str]:
    fake = tmp_path / "flwr"
    fake.write_text(FAKE_FLWR, encoding="utf-8")
    fake.chmod(0o755)
    (tmp_path / "state").mkdir()
    return {**os.environ, "FLWR_CLI": str(fake), "FAKE_STATE": str(tmp_path / "state")}


def _keys(folder: Path, names: list[str]) -> Path:
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / f"{name}.pub").write_text(f"ecdsa-sha2-nistp384 KEY{name.upper()}== {name}\n", encoding="utf-8")
    return folder


def _register(keys: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = REPO / "deploy" / "coordinator" / "register-sites.sh"
    return subprocess.run(
        [str(script), str(keys), "fedscdd"], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def _mapping(keys: Path) -> dict[str, str]:
    rows = [line.split("\t") for line in (keys / "registered.tsv").read_text(encoding="utf-8").splitlines()]
    assert rows[0] == ["name", "node_id", "key_sha256", "registered_at"]
    assert all(len(r) == 4 and len(r[2]) == 64 for r in rows[1:]), rows
    return {r[0]: r[1] for r in rows[1:]}


def test_registration_is_idempotent_and_keeps_the_name_to_node_mapping(
    tmp_path: Path, fake_flwr: dict[str, str]
) -> None:
    keys = _keys(tmp_path / "sites", ["hospital-a", "hospital-b"])
    first = _register(keys, fake_flwr)
    assert first.returncode == 0, first.stderr
    assert _mapping(keys) == {"hospital-a": "1001", "hospital-b": "1002"}
    assert re.search(r"^hospital-a\s+1001\s+registered$", first.stdout, re.M), first.stdout
    again = _register(keys, fake_flwr)  # e.g. configuration management running it on every deploy
    assert again.returncode == 0, again.stderr
    assert (
        again.stdout.count("already registered") == 2
        and "hospital-b: already registered (SuperNode 1002)" in again.stdout
    )
    assert _mapping(keys) == {"hospital-a": "1001", "hospital-b": "1002"}
    _keys(keys, ["hospital-c"])  # a new site joins: only it is new
    third = _register(keys, fake_flwr)
    assert third.returncode == 0 and _mapping(keys) == {
        "hospital-a": "1001",
        "hospital-b": "1002",
        "hospital-c": "1003",
    }


def test_a_failed_registration_is_reported_and_exits_1(tmp_path: Path, fake_flwr: dict[str, str]) -> None:
    keys = _keys(tmp_path / "sites", ["hospital-a", "broken"])
    res = _register(keys, fake_flwr)
    assert res.returncode == 1
    assert "broken: FAILED to register" in res.stderr and "Unable to parse the public key" in res.stderr
    assert "not registered: broken" in res.stderr
    assert _mapping(keys) == {"hospital-a": "1001"}  # what did register is still recorded


def test_registration_refuses_a_missing_or_empty_keys_folder(tmp_path: Path, fake_flwr: dict[str, str]) -> None:
    res = _register(tmp_path / "nope", fake_flwr)
    assert res.returncode == 1 and "no directory" in res.stderr
    (tmp_path / "empty").mkdir()
    res = _register(tmp_path / "empty", fake_flwr)
    assert res.returncode == 1 and "no *.pub files" in res.stderr


def _supernode(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = REPO / "deploy" / "site" / "start-supernode.sh"
    return subprocess.run(
        [str(script)], capture_output=True, text=True, env={**os.environ, **env}, timeout=30, check=False
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "set FEDSCDD_SUPERLINK"),
        ({"FEDSCDD_SUPERLINK": "https://x:8000"}, "without a scheme"),
        ({"FEDSCDD_SUPERLINK": "x:8000", "FEDSCDD_SITE_NAME": "a b"}, "must match"),
        (
            {"FEDSCDD_SUPERLINK": "x:8000", "FEDSCDD_SITE_NAME": "a", "FEDSCDD_DATA_PATH": "rel.h5ad"},
            "must be absolute",
        ),
        (
            {"FEDSCDD_SUPERLINK": "x:8000", "FEDSCDD_SITE_NAME": "a", "FEDSCDD_DATA_PATH": "/nonexistent.h5ad"},
            "cannot read",
        ),
    ],
)
def test_supernode_script_refuses_bad_settings_before_starting_anything(env: dict[str, str], message: str) -> None:
    clean = {k: "" for k in ("FEDSCDD_SUPERLINK", "FEDSCDD_SITE_NAME", "FEDSCDD_DATA_PATH")}
    res = _supernode({**clean, **env})
    assert res.returncode == 1 and message in res.stderr, res.stderr


def test_supernode_script_refuses_a_relative_cache_dir(tmp_path: Path) -> None:
    data = tmp_path / "site.h5ad"
    data.write_bytes(b"")
    res = _supernode(
        {
            "FEDSCDD_SUPERLINK": "x:8000",
            "FEDSCDD_SITE_NAME": "a",
            "FEDSCDD_DATA_PATH": str(data),
            "FEDSCDD_CACHE_DIR": "cache",
        }
    )
    assert res.returncode == 1 and "FEDSCDD_CACHE_DIR must be absolute" in res.stderr, res.stderr
