"""Structured logs: `--log-format json` writes one JSON object per line to stderr.

Fields: ts (ISO 8601 UTC), level, logger, msg; `node` (this node's peer id once known);
`peer` (the first libp2p peer id the message names, if any); `exc` (a traceback, if any).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys

LOG_FORMATS = ("text", "json")
_PEER_ID = re.compile(r"\b(12D3KooW[1-9A-HJ-NP-Za-km-z]{44}|Qm[1-9A-HJ-NP-Za-km-z]{44})\b")
_node_id: str | None = None
_LEVELS = {10: "debug", 20: "info", 30: "warning", 40: "error", 50: "critical"}  # hivemind renames


def set_node_id(peer_id: str | None) -> None:
    global _node_id
    _node_id = peer_id


class JsonFormatter(logging.Formatter):
    """One log record as one line of JSON."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        out: dict[str, object] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": _LEVELS.get(record.levelno, record.levelname.lower()),
            "logger": record.name,
            "msg": msg,
        }
        if _node_id is not None:
            out["node"] = _node_id
        peer = getattr(record, "peer", None) or _first_peer(msg)
        if peer:
            out["peer"] = str(peer)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def _first_peer(msg: str) -> str | None:
    m = _PEER_ID.search(msg)
    return m.group(1) if m else None


def use_json_logs() -> None:
    """Send every log record (hivemind's too) to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # hivemind has its own handler on its loggers: drop it, let them propagate to ours
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")
