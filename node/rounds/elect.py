"""One trainer per fusion round. Every host of the target could train (the result is the same
model), so they elect one: each claims the slot after the last unit (index = number of units);
the earliest live claim trains, renews its claim while it does (training can outlast the claim's
ttl), and publishes the fused expert's id as the slot's result. The others stop when they see
that result; if the trainer dies, its claim expires and the next host takes over. Claims and
results count only from peers that announce the target (and this node): a stranger cannot stop
the hosts by publishing a result on the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from node.rounds import records


class TrainerSlot:
    """The training slot of round `rid` as seen by `node` (a joined node with dht, identity)."""

    def __init__(self, node: Any, rid: bytes, slot: int, ttl: float, target: bytes) -> None:
        self.node, self.rid, self.slot, self.ttl, self.target = node, rid, slot, ttl, target
        self.me: bytes = node.identity.public_key

    async def _hosts(self) -> set[str]:
        """Peer ids that announce the target, and this node's."""
        from node.network.discovery import find_providers

        found = await find_providers(self.node.dht, self.node.network, self.target)
        return {p.peer_id for p in found} | {records.peer_of(self.me)}

    async def _view(self) -> records.UnitView:
        return await records.unit_view(self.node.dht, self.node.network, self.rid, self.slot)

    async def _claim(self) -> None:
        n = self.node
        await records.claim(n.dht, n.identity, n.network, self.rid, self.slot, self.ttl)

    async def elect(self) -> tuple[str, bytes | None]:
        """("done", trainer) once a trainer published; ("mine", me) if this node trains;
        ("other", holder) while another host holds the slot."""
        hosts = await self._hosts()

        def strangers(view: records.UnitView) -> set[bytes]:
            return {o for o in (*view.claims, *view.results) if records.peer_of(o) not in hosts}

        view = await self._view()
        done = sorted(o for o in view.results if o not in strangers(view))
        if done:
            return "done", done[0]
        holder = view.holder(strangers(view))
        if holder is None:
            await self._claim()
            view = await self._view()
            holder = view.holder(strangers(view))
        return ("mine" if holder == self.me else "other"), holder

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Renew our claim every ttl/3 while the body runs."""

        async def renew() -> None:
            while True:
                await asyncio.sleep(self.ttl / 3)
                await self._claim()

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def finish(self, expert_id: bytes, ms: int) -> None:
        n = self.node
        await records.result(n.dht, n.identity, n.network, self.rid, self.slot, expert_id, ms)
