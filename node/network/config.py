"""What `unode join` / `fetch` / `peers` / `experts` are told: flags and env vars, validated.

Every bad value becomes a `UserError` naming the flag, the value and the fix.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hivemind.utils.multiaddr import Multiaddr

from node.errors import UserError
from node.network.allowlist import allowlist_from
from protocol.errors import VersionError
from protocol.identity import default_state_dir
from protocol.version import check_network_name

ENV_INITIAL_PEERS = "UNODE_INITIAL_PEERS"
ENV_NETWORK = "UNODE_NETWORK"
DEFAULT_NETWORK = "main"
DEFAULT_HOST_MADDR = "/ip4/0.0.0.0/tcp/0"
_DOMAIN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class HostedExpert:
    """A model directory this node serves, with the domain it is announced under."""

    path: Path
    domain: str


@dataclass(frozen=True)
class NetworkConfig:
    """How to reach the network: shared by `join` and the one-shot commands (fetch, peers...)."""

    network: str = DEFAULT_NETWORK
    initial_peers: tuple[str, ...] = ()
    host_maddrs: tuple[str, ...] = (DEFAULT_HOST_MADDR,)
    announce_maddrs: tuple[str, ...] = ()
    state_dir: Path = field(default_factory=lambda: default_state_dir())
    allowlist: frozenset[bytes] | None = None  # private network: trusted owner keys (allowlist.py)
    key_file: Path | None = None  # round proposers: sign with this key, not a fresh one


@dataclass(frozen=True)
class JoinConfig:
    """`unode join`: the network, the experts to host, and how often to refresh announcements."""

    net: NetworkConfig
    experts: tuple[HostedExpert, ...] = ()
    ttl: float = 300.0  # seconds an announcement lives in the DHT; refreshed at ttl/3
    summaries: tuple[Path, ...] = ()  # distribution-summary directories (node.fusion) to serve
    max_upload: float | None = None  # bytes per second served to peers, all streams (None: no cap)


def check_network(value: str) -> str:
    try:
        return check_network_name(value)
    except VersionError:
        raise UserError("--network", value, "use 1-32 characters of a-z, 0-9 and '-'") from None


def check_domain(value: str) -> str:
    if not _DOMAIN.match(value):
        raise UserError("--domain", value, "use 1-32 characters of a-z, 0-9, '-' or '_'")
    return value


def check_maddr(flag: str, value: str, need_peer_id: bool) -> str:
    try:
        addr = Multiaddr(value)
        if need_peer_id:
            addr.value_for_protocol("p2p")
    except (ValueError, LookupError) as err:
        fix = "give a multiaddr like /ip4/1.2.3.4/tcp/31337"
        if need_peer_id:
            fix += "/p2p/12D3KooW... (as printed by `unode join`)"
        raise UserError(flag, value, fix, problem=f"not a usable multiaddr ({err})") from None
    return value


def initial_peers_from(flag_values: list[str] | None) -> tuple[str, ...]:
    """--initial-peers wins; otherwise UNODE_INITIAL_PEERS (comma or space separated)."""
    if flag_values:
        return tuple(check_maddr("--initial-peers", v, True) for v in flag_values)
    env = os.environ.get(ENV_INITIAL_PEERS, "")
    return tuple(check_maddr(ENV_INITIAL_PEERS, v, True) for v in re.split(r"[,\s]+", env) if v)


def network_config(
    network: str | None,
    initial_peers: list[str] | None,
    host_maddrs: list[str] | None = None,
    announce_maddrs: list[str] | None = None,
    state_dir: Path | None = None,
    allowlist: Path | None = None,
) -> NetworkConfig:
    return NetworkConfig(
        network=check_network(network or os.environ.get(ENV_NETWORK) or DEFAULT_NETWORK),
        initial_peers=initial_peers_from(initial_peers),
        host_maddrs=tuple(check_maddr("--host-maddr", m, False) for m in host_maddrs or [])
        or (DEFAULT_HOST_MADDR,),
        announce_maddrs=tuple(
            check_maddr("--announce-maddr", m, False) for m in announce_maddrs or []
        ),
        state_dir=Path(state_dir) if state_dir else default_state_dir(),
        allowlist=allowlist_from(allowlist),  # the file, else $UNODE_ALLOWLIST, else open
    )


def hosted_experts(dirs: list[Path] | None, domains: list[str] | None) -> tuple[HostedExpert, ...]:
    """Pair each --expert with its --domain (same count, same order)."""
    dirs, domains = dirs or [], domains or []
    if len(dirs) != len(domains):
        raise UserError(
            "--domain",
            domains,
            f"give one --domain per --expert ({len(dirs)} experts)",
            problem=f"{len(domains)} domains",
        )
    out = []
    for d, dom in zip(dirs, domains, strict=True):
        if not d.is_dir() or not any(d.glob("*.safetensors")):
            raise UserError(
                "--expert",
                str(d),
                "give a Hugging Face model directory with *.safetensors files",
                problem="no safetensors weights here",
            )
        out.append(HostedExpert(d.resolve(), check_domain(dom)))
    return tuple(out)


def check_summary_dir(path: Path) -> Path:
    if not (path / "manifest.json").is_file():
        raise UserError(
            "--summary",
            str(path),
            "give a directory written by `unode summarize`",
            problem="no summary manifest.json there",
        )
    return path.resolve()
