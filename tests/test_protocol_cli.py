"""`unode keys init|show` through the CLI: file mode, refusals, --json, the default state dir."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from protocol.identity import load_identity

RUNNER = CliRunner()


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = RUNNER.invoke(app, ["keys", *args], env=env)
    return result.exit_code, result.stdout, result.stderr


def test_init_then_show_json(tmp_path: Path) -> None:
    state = tmp_path / "state"
    code, out, err = run("init", "--state-dir", str(state), "--json")
    assert code == 0, err
    created = json.loads(out)
    key_file = state / "identity.key"
    assert created["key_file"] == str(key_file) and created["created"] is True
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    identity = load_identity(key_file)
    assert created["peer_id"] == identity.peer_id and created["peer_id"].startswith("12D3KooW")
    assert created["public_key"] == identity.public_key.hex()
    code, out, _ = run("show", "--state-dir", str(state), "--json")
    assert code == 0 and json.loads(out) == {**created, "created": False}
    code, out, _ = run("show", "--state-dir", str(state))
    assert code == 0 and f"peer id     {identity.peer_id}" in out


def test_init_refuses_to_replace_a_key(tmp_path: Path) -> None:
    assert run("init", "--state-dir", str(tmp_path))[0] == 0
    before = (tmp_path / "identity.key").read_bytes()
    code, out, err = run("init", "--state-dir", str(tmp_path))
    assert code == 2 and out == ""
    assert err.startswith("error: key file: already exists") and err.count("\n") == 1
    assert (tmp_path / "identity.key").read_bytes() == before


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o660, 0o604])
def test_show_refuses_a_key_others_can_read(tmp_path: Path, mode: int) -> None:
    assert run("init", "--state-dir", str(tmp_path))[0] == 0
    key_file = tmp_path / "identity.key"
    key_file.chmod(mode)
    code, out, err = run("show", "--state-dir", str(tmp_path))
    assert code == 2 and out == ""
    assert f"chmod 600 {key_file}" in err and err.count("\n") == 1


def test_show_without_a_key_says_how_to_make_one(tmp_path: Path) -> None:
    code, _, err = run("show", "--state-dir", str(tmp_path / "none"))
    assert code == 2 and "unode keys init" in err
    assert not (tmp_path / "none").exists()


def test_unwritable_state_dir_is_a_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = run("init", "--state-dir", str(blocker / "state"))
    assert code == 2 and err.startswith("error: --state-dir:")
    assert blocker.read_text() == "not a directory"


def test_default_state_dir_from_env_through_the_entry_point(tmp_path: Path) -> None:
    env = {**os.environ, "UNODE_STATE_DIR": str(tmp_path / "env-state")}
    script = "import sys; sys.argv[0] = 'unode'; import cli; cli.main()"
    done = subprocess.run(
        [sys.executable, "-c", script, "keys", "init", "--json"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["key_file"] == str(tmp_path / "env-state" / "identity.key")
    code, out, _ = run("show", "--json", env={"UNODE_STATE_DIR": str(tmp_path / "env-state")})
    assert code == 0 and json.loads(out)["peer_id"] == json.loads(done.stdout)["peer_id"]
