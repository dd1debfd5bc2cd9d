"""An upload cap for a node's blob server: a token bucket shared by every stream it serves, so
a volunteer can give the network a fixed share of their uplink (`unode join --max-upload`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenBucket:
    """`rate` bytes per second on average, at most `burst` bytes at once after an idle spell.

    `consume(n)` waits until `n` bytes fit. Waiters are served in arrival order (one lock), so
    one greedy stream cannot starve the others. Clock and sleep are injectable for tests.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        self.clock, self.sleep = clock, sleep
        self.tokens, self.updated = self.burst, clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    async def consume(self, n: int) -> None:
        """Take `n` bytes' worth of tokens, waiting as long as the rate requires. A request
        larger than the burst is allowed: it leaves the bucket in debt, paid back by waiting."""
        async with self._lock:
            self._refill()
            self.tokens -= n
            if self.tokens < 0:
                await self.sleep(-self.tokens / self.rate)
                self._refill()
