"""node/metrics: counters and rates, the stats stream's parser (peer input), JSON log lines,
and the CLI's checks of --metrics-port / --log-format / dashboard flags (exit 2, one line)."""

from __future__ import annotations

import json
import logging
import urllib.request
from datetime import datetime

import msgpack
import pytest
from typer.testing import CliRunner

from cli import app
from node.metrics import logs, registry
from node.metrics.stats import NodeStats, local_stats, parse_stats

GOOD = {
    "uptime_s": 1.5, "bytes_served": 10, "served_bps": 2.0, "bytes_fetched": 0,
    "fetched_bps": 0.0, "units_done": 1, "units_failed": 0,
}  # fmt: skip


def test_rate_meter_averages_over_its_window_and_forgets_old_bytes() -> None:
    meter = registry.RateMeter(window=10.0)
    meter.add(500, now=100.2)
    meter.add(500, now=100.7)  # same second: one bucket
    meter.add(1000, now=105.0)
    assert meter.rate(now=105.5) == pytest.approx(200.0)  # 2000 bytes / 10 s
    assert meter.rate(now=110.5) == pytest.approx(100.0)  # the second-100 bucket has left
    assert meter.rate(now=120.0) == 0.0


def test_hooks_move_the_counters_the_endpoint_serves() -> None:
    before = registry.value(registry.BYTES_SERVED)
    lied = registry.value(registry.PEERS_REJECTED, reason="lied")
    chunks = registry.value(registry.CHUNKS_REJECTED)
    registry.served(4096)
    registry.provider_dropped(lied=True)
    registry.provider_dropped(lied=False)
    assert registry.value(registry.BYTES_SERVED) == before + 4096
    assert registry.value(registry.PEERS_REJECTED, reason="lied") == lied + 1
    assert registry.value(registry.CHUNKS_REJECTED) == chunks + 1  # only the lie
    assert local_stats().bytes_served == before + 4096
    port = registry.start_metrics_server(0, host="127.0.0.1")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert f"unode_bytes_served_total {before + 4096:.1f}" in text
    assert 'unode_peers_rejected_total{reason="failed"}' in text


def test_stats_parser_accepts_the_schema_and_rejects_anything_else() -> None:
    assert parse_stats(msgpack.packb(GOOD)) == NodeStats(**GOOD)  # type: ignore[arg-type]
    bad: list[object] = [
        {**GOOD, "bytes_served": -1},
        {**GOOD, "bytes_served": 1.5},  # a count must be an integer
        {**GOOD, "served_bps": float("nan")},
        {**GOOD, "units_done": True},
        {k: v for k, v in GOOD.items() if k != "uptime_s"},
        [1, 2, 3],
    ]
    for value in bad:
        assert parse_stats(msgpack.packb(value)) is None, value
    assert parse_stats(b"\xc1garbage") is None
    assert parse_stats(b"") is None


def test_json_formatter_writes_one_object_with_peer_fields() -> None:
    peer = "12D3KooW" + "A" * 44
    logs.set_node_id("12D3KooWnode")
    try:
        record = logging.LogRecord("node.x", logging.WARNING, __file__, 1, "provider %s lied",
                                   (peer,), None)  # fmt: skip
        line = logs.JsonFormatter().format(record)
    finally:
        logs.set_node_id(None)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "warning" and obj["logger"] == "node.x"
    assert obj["msg"] == f"provider {peer} lied"
    assert obj["peer"] == peer and obj["node"] == "12D3KooWnode"
    assert datetime.fromisoformat(obj["ts"]).tzinfo is not None


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["join", "--log-format", "xml"], "--log-format"),
        (["join", "--metrics-port", "70000"], "--metrics-port"),
        (["dashboard", "--json", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x"], "--json"),
        (["dashboard", "--once", "--refresh", "0"], "--refresh"),
        (["dashboard", "--once"], "--initial-peers"),
    ],
)
def test_cli_rejects_bad_flags_with_one_line_and_exit_2(
    args: list[str], flag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("UNODE_INITIAL_PEERS", raising=False)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], result.output
