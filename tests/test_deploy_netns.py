"""Multi-host test without Docker: 3 network namespaces on a private bridge, each running a real
`unode join` through deploy/entrypoint.sh. Two are configured as deploy/compose.yaml configures
its bootstrap and volunteer-1 (env file + environment; container paths mapped to temporary
directories, service names resolved through /etc/netns/<ns>/hosts like compose's DNS), the third
as deploy/unode.service configures a volunteer (its EnvironmentFile, Environment=, ExecStart=,
%S/unode as state directory, UNODE_INITIAL_PEERS set as the README says). They discover each
other, a fetch completes; then one host's link goes down and the other two go on.

Needs root and iproute2 (skipped otherwise). The bridge lives in a namespace of its own, so no
address or link is added to the host's network; teardown kills every process in the namespaces,
deletes them and the /etc/netns entries.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from deploy_config import DEPLOY, load_compose, service_env, service_volumes, unit_config

from node.network.lines import ChildLines, starts_with

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
SUBNET = "10.213.7"  # RFC 1918, assigned inside the test's namespaces only
SERVICES = ("bootstrap", "volunteer-1", "unode.service")  # the last one: the systemd unit


def _skip_reason() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root (network namespaces); CI runs as root"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` (apt-get install iproute2)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` unusable here: {probe.stderr.strip()[:120]}"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Host:
    service: str
    ns: str
    addr: str
    veth: str  # its bridge-side link, in the hub namespace
    state: Path
    proc: subprocess.Popen[str] | None = None
    out: ChildLines | None = None

    def wait_for(self, prefix: str, timeout: float) -> str:
        assert self.out is not None
        line = self.out.next_match(starts_with(prefix), timeout)
        if line is None:
            raise AssertionError(f"{self.service}: no {prefix!r}; printed:\n" + self.out.text())
        return line


class Cluster:
    """The namespaces, the bridge, and the `unode join` processes."""

    def __init__(self, tmp: Path) -> None:
        tag = f"ud{os.getpid() % 100000}"
        self.hub = f"{tag}-hub"
        self.tmp = tmp
        self.compose = load_compose()
        self.hosts = [
            Host(svc, f"{tag}-{i}", f"{SUBNET}.{i}", f"{tag}v{i}", tmp / svc / "unode")
            for i, svc in enumerate(SERVICES, start=1)
        ]
        self.namespaces: list[str] = []
        self.made_etc_netns = not Path("/etc/netns").exists()

    def build_network(self) -> None:
        ip("netns", "add", self.hub)
        self.namespaces.append(self.hub)
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        names = "".join(f"{h.addr} {h.service}\n" for h in self.hosts if h.service in SERVICES[:2])
        for h in self.hosts:
            ip("netns", "add", h.ns)
            self.namespaces.append(h.ns)
            ip("link", "add", h.veth, "netns", self.hub, "type", "veth", "peer", "eth0", "netns", h.ns)  # fmt: skip
            ip("-n", self.hub, "link", "set", h.veth, "master", "br0", "up")
            ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
            ip("-n", h.ns, "link", "set", "eth0", "up")
            ip("-n", h.ns, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / h.ns  # `ip netns exec` bind-mounts these over /etc
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("127.0.0.1 localhost\n" + names)

    @property
    def published(self) -> str:
        """What the bootstrap's entrypoint published: its multiaddr with its peer id."""
        return (self.tmp / "volumes/shared/bootstrap.maddr").read_text().strip()

    def env_of(self, host: Host) -> dict[str, str]:
        """The service's compose environment, its volumes mapped to directories under tmp."""
        if host.service == "unode.service":
            return self.unit_env_of(host)
        mounts = {
            target: (self.tmp / "volumes" / source.replace("/", "_"))
            for target, source in service_volumes(self.compose, host.service).items()
        }
        mounts["/var/lib/unode"] = host.state  # the image's UNODE_STATE_DIR and HOME
        env = {"UNODE_STATE_DIR": "/var/lib/unode", "HOME": "/var/lib/unode"}
        env.update(service_env(self.compose, host.service))
        for key, value in env.items():
            for target, path in mounts.items():
                if value.startswith(target):
                    env[key] = str(path) + value[len(target) :]
        for path in mounts.values():
            path.mkdir(parents=True, exist_ok=True)
        env["PATH"] = f"{VENV_BIN}:/usr/bin:/bin"
        return env

    def unit_env_of(self, host: Host) -> dict[str, str]:
        env, _argv = unit_config(DEPLOY / "unode.service", state_root=host.state.parent)
        assert env["UNODE_STATE_DIR"] == str(host.state)
        host.state.mkdir(parents=True, exist_ok=True)
        env["UNODE_INITIAL_PEERS"] = self.published  # the README: set it in unode.env
        env["PATH"] = env["PATH"].replace("/opt/unode/venv/bin", str(VENV_BIN))
        return env

    def command_of(self, host: Host) -> list[str]:
        if host.service == "unode.service":
            _env, argv = unit_config(DEPLOY / "unode.service", host.state.parent)
            assert argv[0] == "/opt/unode/venv/bin/unode-entrypoint"  # deploy/entrypoint.sh
            return argv[1:]
        return list(self.compose["services"][host.service]["command"])

    def run(self, host: Host, *args: str, env: dict[str, str] | None = None) -> list[str]:
        kv = [f"{k}={v}" for k, v in (env or self.env_of(host)).items()]
        return ["ip", "netns", "exec", host.ns, "env", "-i", *kv, *args]

    def start(self, host: Host) -> None:
        argv = self.run(host, "sh", str(DEPLOY / "entrypoint.sh"), *self.command_of(host))
        host.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        host.out = ChildLines(host.proc)

    def cli(self, host: Host, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        """A one-shot `unode` command inside `host`'s namespace, joining via the bootstrap."""
        env = self.env_of(host)
        env["UNODE_INITIAL_PEERS"] = self.published
        argv = self.run(host, str(VENV_BIN / "unode"), *args, env=env)
        t0 = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        print(f"TIMING {args[0]} {time.monotonic() - t0:.1f}s")
        return done

    def teardown(self) -> None:
        for ns in self.namespaces:
            _kill_namespace(ns)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        if self.made_etc_netns:
            with contextlib.suppress(OSError):
                Path("/etc/netns").rmdir()
        for h in self.hosts:
            if h.proc is not None and h.proc.poll() is None:
                h.proc.kill()
            if h.proc is not None:
                h.proc.wait(10)


def _kill_namespace(ns: str) -> None:
    """SIGTERM (clean withdrawal), then SIGKILL, for every process this test ran in `ns`."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 3.0)):
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        alive = [int(p) for p in pids.stdout.split()]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            alive = [int(p) for p in pids.stdout.split()]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        c.build_network()
        yield c
    finally:
        c.teardown()


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _experts(c: Cluster, host: Host, want_providers: int) -> list[dict[str, Any]]:
    """`unode experts --json` from `host`, retried until one expert has enough providers."""
    for _ in range(4):
        done = c.cli(host, "experts", "--json")
        assert done.returncode == 0, done.stderr[-2000:]
        found: list[dict[str, Any]] = json.loads(done.stdout)
        if found and len(found[0]["providers"]) >= want_providers:
            return found
        time.sleep(2)
    raise AssertionError(f"experts never showed {want_providers} providers: {found}")


def test_three_hosts_discover_fetch_and_survive_a_host_cut_off(cluster: Cluster) -> None:
    boot, vol1, unit = cluster.hosts
    t0 = time.monotonic()
    cluster.start(boot)
    cluster.start(vol1)  # its entrypoint waits for the bootstrap's published address
    peer_ids = {boot.service: _ready(boot, t0)}
    published = cluster.published
    assert published == f"/dns4/bootstrap/tcp/31337/p2p/{peer_ids['bootstrap']}"
    cluster.start(unit)  # the unit's volunteer is given that address in its env file
    peer_ids |= {h.service: _ready(h, t0) for h in (vol1, unit)}

    # every host's signed records reach the others: the systemd host sees 3 providers
    (expert,) = _experts(cluster, unit, want_providers=3)
    assert sorted(expert["providers"]) == sorted(peer_ids.values())
    expert_id = str(expert["expert_id"])
    local = _tree(boot.state / "default-expert")
    assert _tree(unit.state / "default-expert") == local  # deterministic: one expert, 3 hosts

    out1 = cluster.tmp / "fetched-before"
    done = cluster.cli(vol1, "fetch", expert_id, str(out1))
    assert done.returncode == 0, done.stderr[-2000:]
    assert _tree(out1) == local

    # cut the systemd host off: its bridge port goes down (its node keeps running, unreachable)
    ip("-n", cluster.hub, "link", "set", unit.veth, "down")
    out2 = cluster.tmp / "fetched-after"
    done = cluster.cli(boot, "fetch", expert_id, str(out2))
    assert done.returncode == 0, done.stderr[-2000:]
    assert _tree(out2) == local
    assert boot.proc is not None and boot.proc.poll() is None
    assert vol1.proc is not None and vol1.proc.poll() is None


def _ready(host: Host, t0: float) -> str:
    """Wait for the node's UNODE_READY line; its peer id."""
    ready = host.wait_for("UNODE_READY", timeout=100)
    print(f"TIMING ready {host.service} {time.monotonic() - t0:.1f}s")
    assert f"/ip4/{host.addr}/tcp/31337/" in ready  # its own namespace's address, fixed port
    return ready.split("peer=")[1].split()[0]
