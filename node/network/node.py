"""The `unode join` process: hosts experts, serves their bytes, keeps announcements fresh, and
stops cleanly on SIGINT/SIGTERM (records withdrawn, DHT and p2pd stopped, exit code 0).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

from node.network.config import JoinConfig
from node.network.process import descendant_pids, kill_all
from node.network.service import BlobServer, ServiceLimits
from node.network.session import Session, run_async

log = logging.getLogger(__name__)
WITHDRAW_TIMEOUT = 5.0
READY_PREFIX = "UNODE_READY"  # one machine-readable line once the node serves and is announced


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived before the event loop was running."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise StopRequested(signal.Signals(signum).name)


def run_join(cfg: JoinConfig, say: Callable[[str], None] | None = None) -> int:
    """Run a node until SIGINT/SIGTERM; returns the process exit code (0 on a clean stop)."""
    out = say or _say
    old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    session: Session | None = None
    try:
        from node.network.hosting import prepare_hosting

        hosting = prepare_hosting(cfg, out)
        session = Session(cfg.net, persistent=True, validators=hosting.validators())
        session.start()
        run_async(_serve(cfg, session, hosting, out))
    except StopRequested as err:
        out(f"unode: {err} received during start-up, stopping")
    finally:
        if session is not None:
            session.stop()
        # hivemind's shared-memory futures start torch_shm_manager; it would linger a few seconds
        kill_all(descendant_pids(os.getpid()), wait=2.0)
        for s, h in old.items():
            signal.signal(s, h)
    out("unode: stopped")
    return 0


async def _serve(
    cfg: JoinConfig, session: Session, hosting: object, out: Callable[[str], None]
) -> None:
    from node.network.hosting import Hosting

    assert isinstance(hosting, Hosting)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, stop.set)
    p2p = await session.p2p()
    server = BlobServer(ServiceLimits(upload_bytes_per_s=cfg.max_upload))
    hosting.register(server)
    await server.start(p2p)
    from node.metrics.stats import serve_stats  # uptime and traffic, for `unode dashboard`

    await serve_stats(p2p, session.peer_id)
    _print_address(cfg, session, out)
    await hosting.announce(session)
    from node.rounds.participant import start_rounds  # cooperative rounds (UNODE_ROUNDS=off)

    rounds = start_rounds(cfg, session, server, hosting, out)
    out(f"{READY_PREFIX} peer={session.peer_id} maddr={session.visible_maddrs()[0]}")
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=hosting.refresh_interval())
        except TimeoutError:
            await hosting.announce(session)
    if rounds is not None:
        rounds.cancel()
    out("unode: stopping: withdrawing announcements")
    try:  # bounded: a stop must not hang on an unreachable network (records expire anyway)
        await asyncio.wait_for(hosting.withdraw(session), WITHDRAW_TIMEOUT)
    except TimeoutError:
        log.warning(
            "withdrawal timed out after %.0f s; announcements will expire", WITHDRAW_TIMEOUT
        )
    await session.close_p2p()


def _print_address(cfg: JoinConfig, session: Session, out: Callable[[str], None]) -> None:
    maddrs = session.visible_maddrs()
    how = "joined" if cfg.net.initial_peers else "started a new"
    out(f"unode: {how} network '{cfg.net.network}' as {session.peer_id}")
    out("unode: others join with: unode join --initial-peers " + _best(maddrs))


def _best(maddrs: list[str]) -> str:
    """Prefer a non-loopback address for the join hint (loopback only helps this machine)."""
    public = [m for m in maddrs if "/127.0.0.1/" not in m and "/::1/" not in m]
    return (public or maddrs)[0]


def _say(line: str) -> None:
    print(line, flush=True)
    sys.stdout.flush()
