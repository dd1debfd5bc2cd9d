"""A search round as seen by a scoring peer: merge each candidate recipe locally, score it on
this node's own held-out data (it never leaves the node) and publish signed Score records.

Held-out data: the held-out split of `node.eval.corpora` for the domains of the experts this
node hosts (UNODE_EVAL_DOMAINS overrides; a node with no known domain scores nothing). In a
guarded search (`RoundSpec.guard`) those texts are cut in two folds by a hash bit: the search
metric is scored on one, HELDBACK_METRIC on the other, which the search never optimises.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from node.metrics import registry as metrics
from node.rounds import records
from node.rounds.inputs import RoundInputs
from node.rounds.spec import RoundSpec, candidate_id
from protocol.records import RoundProposal, Score
from protocol.round_records import HELDBACK_METRIC, SCORE_METRIC

log = logging.getLogger(__name__)
EVAL_DOMAINS_ENV = "UNODE_EVAL_DOMAINS"
EVAL_N_ENV = "UNODE_EVAL_N"


def eval_texts(domain: str, n: int) -> list[str]:
    from node.eval import corpora

    return [e.text for e in corpora.load(domain, n, "heldout")]


def folds(texts: list[str], guard: bool) -> list[tuple[str, list[str]]]:
    """(metric, texts) to score: every text for the search metric, or in a guarded search the
    texts whose SHA-256 starts with an even byte for it and the rest for HELDBACK_METRIC (an
    empty fold is left out)."""
    if not guard:
        return [(SCORE_METRIC, texts)]
    odd = [hashlib.sha256(t.encode()).digest()[0] & 1 for t in texts]
    cut = [
        (SCORE_METRIC, [t for t, o in zip(texts, odd, strict=True) if not o]),
        (HELDBACK_METRIC, [t for t, o in zip(texts, odd, strict=True) if o]),
    ]
    return [(m, f) for m, f in cut if f]


def score_model(
    model_dir: Path, domains: list[str], n: int, guard: bool = False
) -> list[tuple[str, str, float, int, bytes]]:
    """(domain, metric, bits per byte, tokens, eval set hash) per domain and fold, on held-out
    texts (see `folds`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from node.eval.metrics import bits_per_byte, encode

    tok = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    out = []
    for d in domains:
        for metric, texts in folds(eval_texts(d, n), guard):
            n_tokens = sum(len(encode(tok, t)) for t in texts)
            digest = hashlib.sha256("\0".join(texts).encode()).digest()
            out.append((d, metric, bits_per_byte(model, tok, texts), n_tokens, digest))
    return out


class ScoreRun:
    """Scores every candidate of one search generation, one per `step()`."""

    def __init__(self, node: Any, proposal: RoundProposal, spec: RoundSpec, root: Path) -> None:
        self.node, self.proposal, self.spec, self.root = node, proposal, spec, root
        self.rid = proposal.round_id
        self.scored: set[bytes] = set()
        self.inputs: RoundInputs | None = None
        self.domains = self._domains()
        self.n = int(os.environ.get(EVAL_N_ENV, "32"))

    def _domains(self) -> list[str]:
        from node.eval import corpora

        env = os.environ.get(EVAL_DOMAINS_ENV)
        wanted = env.split(",") if env else [h.domain for _, h in self.node.hosting.experts if h]
        return sorted({d for d in wanted if d in corpora.GENERATORS})

    @property
    def finished(self) -> bool:
        return not self.domains or len(self.scored) == len(self.spec.candidates)

    async def step(self) -> None:
        todo = [c for c in self.spec.candidates if candidate_id(c) not in self.scored]
        if not todo:
            return
        if self.inputs is None:
            local = {e.expert_id: e.model_dir for e, _ in self.node.hosting.experts}
            self.inputs = RoundInputs(local, self.node.state_dir / "rounds" / "experts")
            await self.inputs.open(
                self.node.dht, self.node.p2p, self.node.network, self.spec.recipe
            )
            await self.inputs.fetch({r: s.names() for r, s in self.inputs.sources.items()})
        await self._score(todo[0])

    async def _score(self, recipe: dict[str, Any]) -> None:
        from node.merge.api import merge

        assert self.inputs is not None
        cid = candidate_id(recipe)
        out = self.root / "candidates" / cid.hex()
        shutil.rmtree(out, ignore_errors=True)
        sources = self.inputs.sources
        await asyncio.to_thread(merge, recipe, out, progress=False, sources=sources, force=True)
        try:
            results = await asyncio.to_thread(
                score_model, out, self.domains, self.n, self.spec.guard
            )
        finally:
            shutil.rmtree(out, ignore_errors=True)
        for domain, metric, value, n_tokens, digest in results:
            rec = Score(self.rid, cid, domain, metric, float(value), n_tokens, digest)
            await records.score(self.node.dht, self.node.identity, self.node.network, rec)
        self.scored.add(cid)
        metrics.UNITS_DONE.labels("search").inc()
        shown = ", ".join(
            f"{d}={v:.4f}" if m == SCORE_METRIC else f"{d}.{m}={v:.4f}" for d, m, v, _, _ in results
        )
        self.node.say(
            f"unode: round {self.rid.hex()[:12]}: scored candidate {cid.hex()[:12]}: {shown}"
        )

    def close(self) -> None:
        if self.inputs is not None:
            self.inputs.close()
