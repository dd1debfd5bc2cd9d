"""Summary shards on disk: building their arrays, hashing, and reading them back verified."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from node.errors import UserError
from node.fusion.tokens import Encoded

FORMAT = "unode-summaries-1"  # also the protocol SummaryManifest.format


def smallest_uint(max_value: int) -> type[np.unsignedinteger[Any]]:
    """The narrowest unsigned integer dtype holding 0..max_value."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dt).max:
            return dt
    return np.uint64


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def model_sha256(model_dir: Path) -> str:
    """Hash of a model's weights: the sha256 of its safetensors files' hashes, by name."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    joined = "".join(f"{f.name}:{file_sha256(f)}\n" for f in files)
    return hashlib.sha256(joined.encode()).hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    tmp.replace(path)


class ShardBuilder:
    """Collects sequences for one shard and packs them without padding."""

    def __init__(self, vocab_size: int) -> None:
        self.id_dtype = smallest_uint(vocab_size - 1)
        self.seqs: list[tuple[int, Encoded, dict[str, np.ndarray]]] = []

    def add(self, seq_index: int, enc: Encoded, rows: dict[str, np.ndarray]) -> None:
        self.seqs.append((seq_index, enc, rows))

    def arrays(self) -> dict[str, np.ndarray]:
        n_tok = np.array([len(e.ids) for _, e, _ in self.seqs], dtype=np.int64)
        n_pred = np.array([len(r["token_nll"]) for _, _, r in self.seqs], dtype=np.int64)
        offsets = np.concatenate([e.spans for _, e, _ in self.seqs]).reshape(-1, 2)
        nll = [r["token_nll"].astype(np.float64) for _, _, r in self.seqs]
        k = self.seqs[0][2]["topk_ids"].shape[1] if self.seqs else 0
        return {
            "seq_index": np.array([i for i, _, _ in self.seqs], dtype=np.int64),
            "tok_ptr": np.concatenate([[0], np.cumsum(n_tok)]).astype(np.int64),
            "pred_ptr": np.concatenate([[0], np.cumsum(n_pred)]).astype(np.int64),
            "input_ids": np.concatenate([e.ids for _, e, _ in self.seqs]).astype(self.id_dtype),
            "offsets": offsets.astype(smallest_uint(int(offsets.max(initial=0)))),
            "topk_ids": np.concatenate(
                [r["topk_ids"].reshape(-1, k) for _, _, r in self.seqs]
            ).astype(self.id_dtype),
            "topk_logp": np.concatenate(
                [r["topk_logp"].reshape(-1, k) for _, _, r in self.seqs]
            ).astype(np.float16),
            "token_nll": np.concatenate(nll).astype(np.float16),
            "seq_ce": np.array([x.mean() if len(x) else 0.0 for x in nll], dtype=np.float32),
        }


@dataclass(frozen=True)
class SeqSummary:
    """One sequence of a summary, widened for computation. Row i predicts `ids[i + 1]`."""

    ids: np.ndarray  # (n,) int64
    spans: np.ndarray  # (n, 2) int64
    topk_ids: np.ndarray  # (n-1, k) int64
    topk_logp: np.ndarray  # (n-1, k) float32
    token_nll: np.ndarray  # (n-1,) float32
    ce: float


class SummaryReader:
    """A summary directory, its manifest and its shards (hashes checked on open)."""

    def __init__(self, path: Path, verify: bool = True) -> None:
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise UserError("--summaries", str(path), "run `unode summarize` first", "no manifest")
        self.manifest: dict[str, Any] = json.loads(mf.read_text())
        if self.manifest.get("format") != FORMAT:
            raise UserError("--summaries", str(path), f"use {FORMAT} summaries", "unknown format")
        self._rows: dict[int, tuple[dict[str, np.ndarray], int]] = {}
        self._shard: dict[int, str] = {}
        for shard in self.manifest["shards"]:
            f = self.path / shard["file"]
            if verify and (not f.is_file() or file_sha256(f) != shard["sha256"]):
                raise UserError("--summaries", str(f), "re-run `unode summarize`", "bad shard hash")
            arrays = load_file(str(f))
            if verify:
                self._check(f, arrays)
            for pos, seq in enumerate(arrays["seq_index"].tolist()):
                self._rows[seq] = (arrays, pos)
                self._shard[seq] = shard["file"]
        if len(self._rows) != self.manifest["n_seqs"]:
            raise UserError("--summaries", str(path), "re-run `unode summarize`", "incomplete")

    def _check(self, f: Path, arrays: dict[str, np.ndarray]) -> None:
        from node.fusion.summary_check import SummaryContentError, check_shard

        try:
            check_shard(arrays, int(self.manifest["vocab_size"]), int(self.manifest["n_seqs"]))
        except (SummaryContentError, KeyError, TypeError, ValueError) as err:
            raise UserError(
                "--summaries", str(f), "re-run `unode summarize`", f"bad content: {err}"
            ) from None

    @property
    def has_offsets(self) -> bool:
        return bool(self.manifest.get("has_offsets", True))

    @property
    def n_seqs(self) -> int:
        return len(self._rows)

    def shard_of(self, index: int) -> str:
        return self._shard[index]

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path / "tokenizer")

    def sequence(self, index: int) -> SeqSummary:
        a, pos = self._rows[index]
        t0, t1 = int(a["tok_ptr"][pos]), int(a["tok_ptr"][pos + 1])
        p0, p1 = int(a["pred_ptr"][pos]), int(a["pred_ptr"][pos + 1])
        return SeqSummary(
            ids=a["input_ids"][t0:t1].astype(np.int64),
            spans=a["offsets"][t0:t1].astype(np.int64),
            topk_ids=a["topk_ids"][p0:p1].astype(np.int64),
            topk_logp=a["topk_logp"][p0:p1].astype(np.float32),
            token_nll=a["token_nll"][p0:p1].astype(np.float32),
            ce=float(a["seq_ce"][pos]),
        )
