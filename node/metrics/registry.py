"""The process's Prometheus metrics: counters other modules bump through one-line hooks, a
per-second rate over a sliding window, and the HTTP endpoint `unode join --metrics-port` opens.

Hooks never raise and cost a lock and an add: they sit on hot paths (every chunk served).
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)
RATE_WINDOW = 10.0  # seconds the bytes-per-second gauges average over
STARTED = time.time()

BYTES_SERVED = Counter(
    "unode_bytes_served", "Object and manifest bytes sent to peers", registry=REGISTRY
)
BYTES_FETCHED = Counter(
    "unode_bytes_fetched", "Verified bytes received from peers", registry=REGISTRY
)
CHUNKS_REJECTED = Counter(
    "unode_chunks_rejected", "Chunks or objects that failed hash verification", registry=REGISTRY
)
PEERS_REJECTED = Counter(
    "unode_peers_rejected", "Providers dropped (lied, or failed too often)", ["reason"],
    registry=REGISTRY,
)  # fmt: skip
RECORDS_PUBLISHED = Counter(
    "unode_records_published", "Signed records stored in the DHT", registry=REGISTRY
)
RECORDS_REJECTED = Counter(
    "unode_records_rejected", "DHT records dropped on reading (bad signature, schema...)",
    registry=REGISTRY,
)  # fmt: skip
UNITS_DONE = Counter(
    "unode_round_units_done", "Round units this node computed", ["kind"], registry=REGISTRY
)
UNITS_FAILED = Counter(
    "unode_round_units_failed", "Round units rejected or failed here", ["kind"], registry=REGISTRY
)
UPTIME = Gauge("unode_uptime_seconds", "Seconds since this process started", registry=REGISTRY)
UPTIME.set_function(lambda: time.time() - STARTED)


class RateMeter:
    """Bytes per second over the last RATE_WINDOW seconds (one bucket per second)."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._buckets: deque[list[float]] = deque()  # [second, bytes]
        self._lock = threading.Lock()

    def add(self, nbytes: int, now: float | None = None) -> None:
        sec = float(int(now if now is not None else time.time()))
        with self._lock:
            if self._buckets and self._buckets[-1][0] == sec:
                self._buckets[-1][1] += nbytes
            else:
                self._buckets.append([sec, float(nbytes)])
            self._trim(sec)

    def rate(self, now: float | None = None) -> float:
        now = now if now is not None else time.time()
        with self._lock:
            self._trim(now)
            return sum(b for _, b in self._buckets) / self.window

    def _trim(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] <= now - self.window:
            self._buckets.popleft()


SERVED_RATE, FETCHED_RATE = RateMeter(), RateMeter()
Gauge(
    "unode_serve_throughput_bytes_per_second", f"Bytes served per second (last {RATE_WINDOW:.0f} s)",
    registry=REGISTRY,
).set_function(SERVED_RATE.rate)  # fmt: skip
Gauge(
    "unode_fetch_throughput_bytes_per_second",
    f"Verified bytes fetched per second (last {RATE_WINDOW:.0f} s)",
    registry=REGISTRY,
).set_function(FETCHED_RATE.rate)


def served(nbytes: int) -> None:
    """Hook: `nbytes` sent to a peer (blob service)."""
    BYTES_SERVED.inc(nbytes)
    SERVED_RATE.add(nbytes)


def fetched(nbytes: int) -> None:
    """Hook: `nbytes` received from a peer and verified."""
    BYTES_FETCHED.inc(nbytes)
    FETCHED_RATE.add(nbytes)


def provider_dropped(lied: bool) -> None:
    """Hook: a provider was dropped; a lie also counts as a rejected chunk."""
    PEERS_REJECTED.labels("lied" if lied else "failed").inc()
    if lied:
        CHUNKS_REJECTED.inc()


def value(counter: Counter, **labels: str) -> float:
    """The current total of a counter (summed over label values unless some are given)."""
    total = 0.0
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


def start_metrics_server(port: int, host: str = "0.0.0.0") -> int:
    """Serve /metrics on `port` (0: any free port) in a daemon thread; returns the port."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return int(server.server_port)
