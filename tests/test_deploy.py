"""deploy/: the systemd unit (systemd-analyze verify), the compose file (`docker compose config`
where the plugin exists, its structure always), the env file against the variables the code
reads and the options `unode join` takes, the Dockerfile's order, and the entrypoint script."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
import yaml
from deploy_config import (
    DEPLOY,
    documented_variables,
    load_compose,
    read_env_file,
    service_env,
    service_volumes,
)

ROOT = DEPLOY.parent
UNIT = DEPLOY / "unode.service"
ENV_FILE = DEPLOY / "unode.env"
OUTPUT_MARKERS = {"UNODE_READY", "UNODE_ROUND_DONE"}  # lines the node prints, not settings


def unit_directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = tmp_path / "unode.service"  # its ExecStart must exist: point it at the repo's script
    unit.write_text(
        UNIT.read_text().replace(
            "/opt/unode/venv/bin/unode-entrypoint", str(DEPLOY / "entrypoint.sh")
        )
    )
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "unode.service" not in done.stderr, done.stderr  # no warning about our unit


def test_systemd_unit_is_hardened_and_restarts() -> None:
    d = unit_directives()
    expected = {
        "User": "unode",
        "StateDirectory": "unode",
        "StateDirectoryMode": "0700",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "KillSignal": "SIGTERM",
        "EnvironmentFile": "/etc/unode/unode.env",
    }
    assert {k: d.get(k, ["(missing)"])[-1] for k in expected} == expected
    assert "UNODE_STATE_DIR=%S/unode" in d["Environment"][0].split()
    assert d["ExecStart"] == ["/opt/unode/venv/bin/unode-entrypoint join"]


def _compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` (v1, Debian's package), if installed."""
    if shutil.which("docker") is not None:
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.skipif(_compose_command() is None, reason="neither docker compose nor docker-compose")
def test_compose_file_passes_compose_config_and_resolves_as_the_tests_read_it() -> None:
    base = [*(_compose_command() or []), "-f", str(DEPLOY / "compose.yaml")]
    done = subprocess.run([*base, "config"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    compose = load_compose()
    assert {"bootstrap", "volunteer-1", "volunteer-2", "volunteer-3", "dashboard"} <= set(resolved)
    for name, service in resolved.items():  # tests/deploy_config.py agrees with compose itself
        assert {k: str(v) for k, v in service["environment"].items()} == service_env(
            compose, name
        ), name


def test_compose_has_a_bootstrap_three_volunteers_and_a_dashboard() -> None:
    compose = load_compose()
    services = compose["services"]
    default = {n for n, s in services.items() if not s.get("profiles")}
    assert default == {"bootstrap", "volunteer-1", "volunteer-2", "volunteer-3", "dashboard"}
    boot = service_env(compose, "bootstrap")
    assert boot["UNODE_PUBLISH_MADDR"] == "/dns4/bootstrap/tcp/31337"
    assert boot["UNODE_HOST_MADDR"].endswith("/tcp/31337") and "UNODE_INITIAL_PEERS" not in boot
    for name, service in services.items():
        env = service_env(compose, name)
        if name != "bootstrap":  # everyone else finds the bootstrap through its published file
            assert env["UNODE_INITIAL_PEERS_FILE"] == boot["UNODE_PUBLISH_FILE"], name
            assert service_volumes(compose, name)["/run/unode-shared"] == "shared", name
            assert set(service.get("depends_on", [])) == {"bootstrap"}, name
        assert service_volumes(compose, name)["/var/lib/unode"] == f"{name}-state", name
        declared = set(compose["volumes"])
        named = {v for v in service_volumes(compose, name).values() if not v.startswith(".")}
        assert named <= declared, name
    assert services["dashboard"]["command"][0] == "dashboard"
    assert services["volunteer-1"]["command"] == ["join"]
    inst = service_env(compose, "institution")
    assert (inst["UNODE_EXPERT"], inst["UNODE_DOMAIN"]) == ("/models/coder", "code")


def test_every_variable_used_by_deploy_files_is_documented_in_the_env_file() -> None:
    documented = documented_variables(ENV_FILE)
    compose = load_compose()
    used = {k for name in compose["services"] for k in service_env(compose, name)}
    used |= set(re.findall(r"\$\{?(UNODE_[A-Z0-9_]+)", (DEPLOY / "entrypoint.sh").read_text()))
    assert {v for v in used if v.startswith("UNODE_")} - documented == set()


def test_env_file_documents_every_variable_the_code_reads() -> None:
    sources = [ROOT / "cli.py", *ROOT.glob("node/**/*.py"), *ROOT.glob("protocol/**/*.py")]
    read = {
        name
        for path in sources
        for name in re.findall(r"[\"'](UNODE_[A-Z0-9_]+)[\"']", path.read_text())
        if not name.startswith("UNODE_TEST_")
    }
    missing = read - OUTPUT_MARKERS - documented_variables(ENV_FILE)
    assert missing == set(), f"document these in deploy/unode.env: {sorted(missing)}"


def test_every_join_option_has_an_environment_variable() -> None:
    from cli import app

    join = typer.main.get_command(app).commands["join"]  # type: ignore[attr-defined]
    no_env = {p.name for p in join.params if p.name != "help" and not p.envvar}
    # these read their variable themselves (node/network/config.py, protocol/identity.py)
    assert no_env == {"initial_peers", "network", "state_dir", "allowlist"}
    assert {p.envvar for p in join.params if p.envvar} <= documented_variables(ENV_FILE)


def test_environment_configures_join_like_the_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli import app

    env = read_env_file(ENV_FILE)
    env |= {
        "UNODE_EXPERT": f"{tmp_path}/coder:{tmp_path}/math",
        "UNODE_DOMAIN": "code math",
        "UNODE_ANNOUNCE_MADDR": "/ip4/203.0.113.7/tcp/31337",
        "UNODE_VERBOSE": "1",
        "UNODE_TTL": "120",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    join = typer.main.get_command(app).commands["join"]  # type: ignore[attr-defined]
    params = join.make_context("join", []).params
    assert list(params["host_maddr"]) == ["/ip4/0.0.0.0/tcp/31337"]
    assert list(params["announce_maddr"]) == ["/ip4/203.0.113.7/tcp/31337"]
    assert [Path(p) for p in params["expert"]] == [tmp_path / "coder", tmp_path / "math"]
    assert list(params["domain"]) == ["code", "math"]
    assert (params["ttl"], params["verbose"]) == (120.0, True)
    flags = join.make_context("join", ["--ttl", "60", "--host-maddr", "/ip4/0.0.0.0/tcp/1"])
    assert flags.params["ttl"] == 60.0
    assert list(flags.params["host_maddr"]) == ["/ip4/0.0.0.0/tcp/1"]


def test_dockerfile_installs_cpu_torch_first_and_runs_unprivileged() -> None:
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile").read_text().splitlines()]
    text = "\n".join(lines)
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in lines
    assert "FROM ${BASE_IMAGE}" in lines
    assert "ARG TORCH_VERSION=2.13.0" in lines
    assert re.search(r"ARG TORCH_INDEX_URL=\S+/whl/cpu$", text, flags=re.M)
    torch_at = text.index('pip install "torch==${TORCH_VERSION}" --index-url')
    assert torch_at < text.index("RUN pip install .")
    assert [ln for ln in lines if ln][-3:] == [
        "STOPSIGNAL SIGTERM",
        'ENTRYPOINT ["unode-entrypoint"]',
        'CMD ["join"]',
    ]
    assert text.index("USER unode") > text.index("RUN pip install .")
    for src in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies a missing {path}"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed here")
def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        ["hadolint", "--failure-threshold", "error", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_entrypoint_is_valid_sh_and_gives_up_without_a_bootstrap(tmp_path: Path) -> None:
    script = str(DEPLOY / "entrypoint.sh")
    assert subprocess.run(["sh", "-n", script], capture_output=True).returncode == 0
    env = {
        "PATH": "/usr/bin:/bin",
        "UNODE_STATE_DIR": str(tmp_path),
        "UNODE_INITIAL_PEERS_FILE": str(tmp_path / "never.maddr"),
        "UNODE_WAIT_SECONDS": "1",
    }
    done = subprocess.run(
        ["sh", script, "join"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert f"no {tmp_path / 'never.maddr'}" in done.stderr


def test_build_context_filter_keeps_exactly_what_the_dockerfile_copies() -> None:
    rules = [
        ln
        for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    assert rules[0] == "*"  # everything else (.venv, caches) stays out of the context
    kept = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    text = (DEPLOY / "Dockerfile").read_text()
    copied = {p for src in re.findall(r"^COPY (.+) \S+$", text, flags=re.M) for p in src.split()}
    assert kept == copied
