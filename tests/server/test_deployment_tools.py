"""Operator tooling of the deployment guide: `scdd flwr-connection` and `scdd verify-bundle`
(server/cli/deployment.py)."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from server.cli import main
from server.cli.deployment import BundleError, build_release_fab, verify_bundle, write_connection
from server.pki.certs import generate_all
from shared.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def flwr_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    generate_all(out, sans=["127.0.0.1"], site_names=["site-a"])
    return out / "ca.crt"


def _flwr_first_use(home: Path) -> None:
    """What the first `flwr` command writes: the file the guide's old copy-paste step collided with."""
    from flwr.cli.flower_config import init_flwr_config

    init_flwr_config()
    assert (home / "config.toml").is_file()


def test_connection_is_merged_into_the_config_flwr_wrote_and_made_the_default(flwr_home: Path, ca: Path) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    _flwr_first_use(flwr_home)
    path = write_connection("fedscdd", "10.0.0.5:8000", ca)
    config = tomllib.loads(path.read_text(encoding="utf-8"))["superlink"]
    assert config["default"] == "fedscdd" and {"local", "supergrid", "fedscdd"} <= set(
        config
    )  # flwr's own entries kept
    conn = read_superlink_connection()  # what `flwr ls` etc. will use without a connection name
    assert (conn.name, conn.address, conn.root_certificates) == ("fedscdd", "10.0.0.5:8000", str(ca.resolve()))
    # run again with another address: replaced, not duplicated; --no-default leaves the default alone
    write_connection("fedscdd", "coordinator.example.org:8000", ca)
    write_connection("backup", "127.0.0.1:8001", ca, make_default=False)
    config = tomllib.loads(path.read_text(encoding="utf-8"))["superlink"]
    assert config["fedscdd"]["address"] == "coordinator.example.org:8000" and config["default"] == "fedscdd"
    assert config["backup"]["address"] == "127.0.0.1:8001"


def test_connection_on_a_machine_where_flwr_never_ran(flwr_home: Path, ca: Path) -> None:
    path = write_connection("fedscdd", "[::1]:8000", ca)
    assert path == flwr_home / "config.toml"
    assert tomllib.loads(path.read_text(encoding="utf-8"))["superlink"]["default"] == "fedscdd"


@pytest.mark.parametrize(
    ("address", "match"),
    [
        ("https://10.0.0.5:8000", "without a scheme"),
        ("10.0.0.5", "HOST:PORT"),
        ("10.0.0.5:99999", "HOST:PORT"),
        ("a b:1", "HOST:PORT"),
    ],
)
def test_bad_addresses_are_refused(flwr_home: Path, ca: Path, address: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        write_connection("fedscdd", address, ca)
    assert not (flwr_home / "config.toml").exists()  # nothing written


def test_bad_certificates_names_and_configs_are_refused(flwr_home: Path, ca: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        write_connection("fedscdd", "10.0.0.5:8000", tmp_path / "nope.crt")
    with pytest.raises(ConfigError, match="not a PEM CA certificate"):
        write_connection("fedscdd", "10.0.0.5:8000", ca.parent / "sites" / "site-a.pub")
    with pytest.raises(ConfigError, match="connection name"):
        write_connection("my connection", "10.0.0.5:8000", ca)
    # the old guide's trap: the example pasted whole below flwr's own [superlink] table
    _flwr_first_use(flwr_home)
    broken = (flwr_home / "config.toml").read_text(encoding="utf-8") + '\n[superlink]\ndefault = "fedscdd"\n'
    (flwr_home / "config.toml").write_text(broken, encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        write_connection("fedscdd", "10.0.0.5:8000", ca)
    assert (flwr_home / "config.toml").read_text(encoding="utf-8") == broken  # left for the operator to fix


def test_flwr_connection_command(flwr_home: Path, ca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flwr-connection", "--address", "127.0.0.1:9", "--root-certificates", str(ca)]) == 0
    out = capsys.readouterr().out
    assert f"connection 'fedscdd' (the default) -> https://127.0.0.1:9 written to {flwr_home / 'config.toml'}" in out
    assert "not reachable yet" in out  # nothing listens on port 9
    assert main(["flwr-connection", "--address", "https://x:1", "--root-certificates", str(ca)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scdd flwr-connection: error: address"), err


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path]:
    """The FAB of this checkout and the folder a SuperNode would install it into (Flower's own installer)."""
    from flwr.cli.install import install_from_fab

    fab = build_release_fab(REPO)
    home = tmp_path_factory.mktemp("supernode-home")
    install_from_fab(fab, home, skip_prompt=True)
    return fab, home


def _copy(release: tuple[bytes, Path], tmp_path: Path) -> tuple[bytes, Path]:
    fab, home = release
    shutil.copytree(home, tmp_path / "home")
    return fab, tmp_path / "home"


def test_a_valid_bundle_passes_from_its_folder_or_the_supernode_home(
    release: tuple[bytes, Path], tmp_path: Path
) -> None:
    fab, home = _copy(release, tmp_path)
    app = next((home / "apps").iterdir())
    (app / "server" / "__pycache__").mkdir()
    (app / "server" / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"written when the app ran")
    for where in (home, home / "apps", app):
        result = verify_bundle(where, fab)
        assert result.ok and result.app_dir == app, result.summary()
    assert result.n_files >= 40 and result.bytecode_files == 1 and "OK: the" in result.summary()
    assert {"client/app.py", "server/app.py", "pyproject.toml"} <= set(_names(fab))


def _names(fab: bytes) -> list[str]:
    from server.cli.deployment import fab_files

    return list(fab_files(fab))


def test_a_changed_missing_or_added_file_fails(release: tuple[bytes, Path], tmp_path: Path) -> None:
    fab, home = _copy(release, tmp_path)
    app = next((home / "apps").iterdir())
    with open(app / "client" / "tasks.py", "a", encoding="utf-8") as fh:
        fh.write("\nimport os  # exfiltrate\n")
    (app / "shared" / "io.py").unlink()
    (app / "client" / "helper.py").write_text("print('hi')\n", encoding="utf-8")
    result = verify_bundle(home, fab)
    assert not result.ok
    assert (
        result.changed == ("client/tasks.py",)
        and result.missing == ("shared/io.py",)
        and result.extra == ("client/helper.py",)
    )
    assert "MISMATCH" in result.summary() and "changed: client/tasks.py" in result.summary()


def test_a_symlink_or_another_published_hash_fails(release: tuple[bytes, Path], tmp_path: Path) -> None:
    fab, home = _copy(release, tmp_path)
    app = next((home / "apps").iterdir())
    target = app / "README.md"
    saved = tmp_path / "README.md"
    shutil.move(target, saved)
    target.symlink_to(saved)  # same bytes, but not a file Flower installed
    assert verify_bundle(home, fab).changed == ("README.md",)
    target.unlink()
    shutil.move(saved, target)
    assert verify_bundle(home, fab).ok
    result = verify_bundle(home, fab, published_hash="0" * 64)
    assert not result.ok and "published fab-hash" in result.problems[0]


def test_no_app_of_this_release_is_reported(release: tuple[bytes, Path], tmp_path: Path) -> None:
    fab, home = _copy(release, tmp_path)
    app = next((home / "apps").iterdir())
    app.rename(app.with_name(app.name[:-8] + "deadbeef"))  # installed from another FAB
    with pytest.raises(BundleError, match=r"no app installed from this release's FAB.*deadbeef"):
        verify_bundle(home, fab)
    assert not verify_bundle(
        home / "apps" / (app.name[:-8] + "deadbeef"), fab
    ).ok  # named directly: compared, and refused
    with pytest.raises(BundleError, match="not a directory"):
        verify_bundle(tmp_path / "nowhere", fab)
    with pytest.raises(BundleError, match="not a checkout"):
        build_release_fab(tmp_path)


@pytest.mark.slow  # over 5 s: outside the fast tier
def test_verify_bundle_command(release: tuple[bytes, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, home = _copy(release, tmp_path)
    assert main(["verify-bundle", str(home), "--source", str(REPO)]) == 0
    assert "OK: the" in capsys.readouterr().out
    (next((home / "apps").iterdir()) / "README.md").write_text("changed\n", encoding="utf-8")
    assert main(["verify-bundle", str(home), "--source", str(REPO)]) == 1
    assert "changed: README.md" in capsys.readouterr().out
    assert main(["verify-bundle", str(tmp_path / "nowhere"), "--source", str(REPO)]) == 1
    assert "scdd verify-bundle: error:" in capsys.readouterr().err
