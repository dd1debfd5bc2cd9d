"""Fusion-round data: corpus shards, and summary directories packed for transfer and combined.

A summaries directory (node/fusion) has a `tokenizer/` subdirectory, which an expert manifest
does not describe; packing flattens it to `tok.<file>`. Combining puts the per-shard summaries
of one source back together as one directory for the whole corpus (sequence indexes offset).
The trained output loses what differs between honest trainers (`portable_output`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from node.errors import UserError
from node.fusion.summary_check import SummaryContentError, check_shard
from node.fusion.summary_store import FORMAT, file_sha256, write_json_atomic

TOK_PREFIX = "tok."


def split_corpus(path: Path, n_shards: int) -> list[bytes]:
    """Contiguous groups of a jsonl corpus's lines; their concatenation is the file's bytes."""
    if path.suffix != ".jsonl" or not path.is_file():
        raise UserError("--corpus", str(path), "give an instruction-response .jsonl file")
    lines = path.read_bytes().splitlines(keepends=True)
    examples = [i for i, ln in enumerate(lines) if ln.strip()]
    if len(examples) < n_shards:
        raise UserError("--shards", n_shards, f"use at most {len(examples)} (one example each)")
    cuts = [examples[len(examples) * k // n_shards] for k in range(n_shards)] + [len(lines)]
    cuts[0] = 0
    return [b"".join(lines[cuts[k] : cuts[k + 1]]) for k in range(n_shards)]


def pack(summary_dir: Path, out: Path) -> None:
    """A flat copy of a summaries directory (tokenizer files renamed `tok.<name>`)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in summary_dir.iterdir():
        if f.is_file() and f.name != "progress.json":
            shutil.copyfile(f, tmp / f.name)
    for f in (summary_dir / "tokenizer").iterdir():
        shutil.copyfile(f, tmp / (TOK_PREFIX + f.name))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)


def poison(d: Path) -> None:
    """Test fault injector: a NaN in the first shard of packed summaries `d` (hash updated)."""
    mf = json.loads((d / "manifest.json").read_text())
    f = d / mf["shards"][0]["file"]
    arrays = load_file(str(f))
    arrays["topk_logp"].flat[0] = float("nan")
    save_file(arrays, str(f), metadata={"format": FORMAT})
    mf["shards"][0]["sha256"] = file_sha256(f)
    write_json_atomic(d / "manifest.json", mf)


def mislead(d: Path) -> None:
    """Test fault injector: plausible but wrong packed summaries `d` (hashes updated). Each
    shard's prediction rows move down by one (every position gets the previous position's
    distribution): shapes, ids, sorted finite log-probs all pass the content checks."""
    mf = json.loads((d / "manifest.json").read_text())
    for entry in mf["shards"]:
        f = d / entry["file"]
        a = load_file(str(f))
        for name in ("topk_ids", "topk_logp", "token_nll"):
            a[name] = np.roll(a[name], 1, axis=0)
        nll = np.split(a["token_nll"].astype(np.float64), a["pred_ptr"][1:-1])
        a["seq_ce"] = np.array([x.mean() if len(x) else 0.0 for x in nll], dtype=np.float32)
        save_file(a, str(f), metadata={"format": FORMAT})
        entry["sha256"] = file_sha256(f)
    write_json_atomic(d / "manifest.json", mf)


def check_packed(d: Path) -> None:
    """Raise SummaryContentError unless every shard of packed summaries `d` (a peer's unit
    result) passes the content checks of node/fusion/summary_check."""
    try:
        mf = json.loads((d / "manifest.json").read_text())
        if mf.get("format") != FORMAT:
            raise SummaryContentError(f"not {FORMAT} summaries")
        for entry in mf["shards"]:
            arrays = load_file(str(d / Path(entry["file"]).name))
            check_shard(arrays, int(mf["vocab_size"]), int(mf["n_seqs"]))
    except SummaryContentError:
        raise
    except (OSError, KeyError, TypeError, ValueError) as err:  # an unreadable or odd directory
        raise SummaryContentError(f"{type(err).__name__}: {err}") from None


def combine(packed: list[Path], out: Path, corpus_sha256: str) -> None:
    """One summaries directory over the whole corpus from per-shard packed directories, in order."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tokenizer").mkdir(parents=True)
    manifests = [json.loads((d / "manifest.json").read_text()) for d in packed]
    shards, offset = [], 0
    for k, (d, mf) in enumerate(zip(packed, manifests, strict=True)):
        if mf.get("format") != FORMAT:
            raise ValueError(f"{d}: not {FORMAT} summaries")
        for j, entry in enumerate(mf["shards"]):
            arrays = load_file(str(d / entry["file"]))
            check_shard(arrays, int(mf["vocab_size"]), int(mf["n_seqs"]))  # untrusted peer data
            arrays["seq_index"] = arrays["seq_index"] + arrays["seq_index"].dtype.type(offset)
            name = f"shard-{k:05d}-{j:05d}.safetensors"
            save_file(arrays, str(tmp / name), metadata={"format": FORMAT})
            shards.append({"file": name, "sha256": file_sha256(tmp / name)})
        offset += int(mf["n_seqs"])
    for f in packed[0].iterdir():
        if f.name.startswith(TOK_PREFIX):
            shutil.copyfile(f, tmp / "tokenizer" / f.name[len(TOK_PREFIX) :])
    manifest = {
        **manifests[0],
        "corpus_sha256": corpus_sha256,
        "n_seqs": offset,
        "shards": shards,
        "has_offsets": all(m.get("has_offsets", True) for m in manifests),
    }
    write_json_atomic(tmp / "manifest.json", manifest)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)


LOCAL_PATH_KEYS = ("corpus", "out", "target", "path")


def portable_output(out: Path, root: Path) -> None:
    """Strip what differs between honest trainers, so each announces the same expert id.

    Training is deterministic (same summaries, corpus, seed), but the lineage names local
    paths and the loss log holds wall times: both would change the manifest hash. Paths are
    dropped (content hashes stay) and the loss log moves next to the round's state.
    """
    losses = out / "train_log.jsonl"
    if losses.exists():
        losses.replace(root / "train_log.jsonl")
    lineage_file = out / "lineage.json"
    lineage = json.loads(lineage_file.read_text())

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: strip(v)
                for k, v in node.items()
                if k not in LOCAL_PATH_KEYS or not isinstance(v, str)
            }
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    lineage_file.write_text(json.dumps(strip(lineage), indent=2, sort_keys=True) + "\n")
