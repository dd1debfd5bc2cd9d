"""Protocol version and DHT key namespacing: every key lives under `unode/<network>/v<version>/`."""

from __future__ import annotations

import re

from protocol.errors import VersionError

PROTOCOL_VERSION = 1
KEY_ROOT = "unode"
_NETWORK_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


def check_network_name(network: str) -> str:
    """Return `network` if it is a valid network name (1-32 chars of a-z, 0-9, '-'), else raise."""
    if not isinstance(network, str) or _NETWORK_RE.fullmatch(network) is None:
        raise VersionError(f"network name {network!r} must match [a-z0-9][a-z0-9-]{{0,31}}")
    return network


def namespace(network: str, version: int = PROTOCOL_VERSION) -> str:
    """The prefix of every DHT key of `network` at protocol `version`, e.g. 'unode/main/v1'."""
    return f"{KEY_ROOT}/{check_network_name(network)}/v{version}"


def check_version(version: object) -> int:
    """Raise VersionError unless `version` is exactly this node's PROTOCOL_VERSION."""
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise VersionError(f"protocol version {version!r} is not {PROTOCOL_VERSION}")
    return version
