"""Read deploy/'s env file and compose file the way Docker Compose does, for the deploy tests.

A service's environment is the env file(s) first, then its `environment:` (which wins), with
`${VAR:-default}` interpolated from the caller's variables; volumes map container paths.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
_INTERPOLATE = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")


def read_env_file(path: Path) -> dict[str, str]:
    """VARIABLE=value lines; '#' lines and blank lines skipped (compose's env_file format)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not VARIABLE=value: {line!r}"
        out[key.strip()] = value
    return out


def documented_variables(path: Path) -> set[str]:
    """Every UNODE_* variable the env file sets or shows commented out."""
    return set(re.findall(r"^#?(UNODE_[A-Z0-9_]+)=", path.read_text(), flags=re.M))


def load_compose(path: Path = DEPLOY / "compose.yaml") -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def interpolate(value: str, variables: dict[str, str]) -> str:
    return _INTERPOLATE.sub(lambda m: variables.get(m.group(1)) or (m.group(2) or ""), value)


def service_env(
    compose: dict[str, Any], name: str, variables: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment compose gives service `name` (env_file, then environment)."""
    service = compose["services"][name]
    files = service.get("env_file", [])
    env: dict[str, str] = {}
    for f in [files] if isinstance(files, str) else files:
        env.update(read_env_file(DEPLOY / f))
    for key, value in (service.get("environment") or {}).items():
        env[key] = interpolate(str(value if value is not None else ""), variables or {})
    return env


def service_volumes(compose: dict[str, Any], name: str) -> dict[str, str]:
    """container path -> volume name (or host path) for service `name`."""
    out = {}
    for spec in compose["services"][name].get("volumes", []):
        source, target = spec.split(":")[:2]
        out[target] = source
    return out


def unit_config(unit: Path, state_root: Path) -> tuple[dict[str, str], list[str]]:
    """The environment and command the systemd unit gives `unode` (%S is `state_root`; its
    EnvironmentFile is deploy/unode.env, as the README installs it)."""
    env: dict[str, str] = {}
    argv: list[str] = []
    for line in unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if not sep or line.startswith("#"):
            continue
        if key == "EnvironmentFile":
            assert value == "/etc/unode/unode.env", value
            env.update(read_env_file(DEPLOY / "unode.env"))
        elif key == "Environment":
            for item in shlex.split(value.replace("%S", str(state_root))):
                name, _, setting = item.partition("=")
                env[name] = setting
        elif key == "ExecStart":
            argv = shlex.split(value)
    return env, argv
