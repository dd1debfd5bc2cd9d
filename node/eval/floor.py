"""The floor shared by both searches of merge coefficients (the network's `unode round search
--floor` and the zoo's evidence bench): a candidate must keep a share of each reference
score (bits per byte, lower is better), or its score pays for the shortfall."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FLOOR_PENALTY = 4.0  # score lost (bench) or raised (network) per unit of share below the floor


def shortfall(s: Mapping[Any, float], refs: Mapping[Any, float], floor: float) -> float:
    """Sum over the keys with a reference of how far the share kept (reference / score, for
    bits per byte) falls below `floor`; 0 when every key keeps at least that (or floor is 0).
    The evidence bench keys it by (expert, domain), the network search by (scorer, domain)."""
    return sum(max(0.0, floor - refs[k] / v) for k, v in s.items() if k in refs and v > 0)
