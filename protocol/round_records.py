"""Round records: RoundProposal (round id = its hash()), WorkClaim, UnitResult, Score.

The signer of each (the envelope owner) is the proposer, claimant, worker or scorer.
"""

from __future__ import annotations

import dataclasses

from protocol.schema import HASH, TAG, Float, Int, ListOf, Opt, Record, Str, spec

MAX_UNITS = 1 << 20
_UNIT = Int(0, MAX_UNITS - 1)
_NAME = Str(64, r"[a-z0-9_]+")
SCORE_METRIC = "bits_per_byte"  # a search candidate's score on the texts the search sees
HELDBACK_METRIC = "heldback_bpb"  # a guarded search: the same on texts the search never sees


def score_item(domain: str, metric: str) -> str:
    """The DHT subkey item of a Score: the domain for the search metric, `domain.metric` for
    any other (so one scorer keeps one record per domain and metric)."""
    return domain if metric == SCORE_METRIC else f"{domain}.{metric}"


@dataclasses.dataclass(frozen=True)
class RoundProposal(Record):
    """A merge or fusion round over signed inputs; the full recipe travels over P2P by hash."""

    TYPE = "round_proposal"
    MAX_BYTES = 8192
    kind: str = spec(Str(16, choices=("merge", "fusion")))
    inputs: tuple[bytes, ...] = spec(ListOf(HASH, 64))  # expert ids, in recipe order
    base: bytes | None = spec(Opt(HASH))  # base expert id for task-vector methods
    method: str = spec(_NAME)
    recipe_hash: bytes = spec(HASH)
    seed: int = spec(Int(0, (1 << 64) - 1))  # DARE/DELLA randomness derives from it
    n_units: int = spec(Int(1, MAX_UNITS))
    deadline_ms: int = spec(Int(0, 1 << 53))  # Unix time in ms
    domains: tuple[str, ...] = spec(ListOf(TAG, 16, sorted_unique=True))

    @property
    def round_id(self) -> bytes:
        return self.hash()


@dataclasses.dataclass(frozen=True)
class WorkClaim(Record):
    """'I am computing unit `unit` of this round' (expires if the worker disappears)."""

    TYPE = "work_claim"
    MAX_BYTES = 512
    round_id: bytes = spec(HASH)
    unit: int = spec(_UNIT)


@dataclasses.dataclass(frozen=True)
class UnitResult(Record):
    """The content hash of a computed unit (any peer can recompute it bit for bit)."""

    TYPE = "unit_result"
    MAX_BYTES = 1024
    round_id: bytes = spec(HASH)
    unit: int = spec(_UNIT)
    result_hash: bytes = spec(HASH)
    elapsed_ms: int = spec(Int(0, 1 << 53))


@dataclasses.dataclass(frozen=True)
class Score(Record):
    """One peer's evaluation of one candidate on one domain of its own held-out data."""

    TYPE = "score"
    MAX_BYTES = 1024
    round_id: bytes = spec(HASH)
    candidate: bytes = spec(HASH)
    domain: str = spec(TAG)
    metric: str = spec(_NAME)
    value: float = spec(Float())
    n_tokens: int = spec(Int(0, 1 << 53))
    eval_set_hash: bytes = spec(HASH)


ROUND_RECORDS: tuple[type[Record], ...] = (RoundProposal, WorkClaim, UnitResult, Score)
