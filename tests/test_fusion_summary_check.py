"""Content checks of summaries from peers: every kind of impossible content is refused with a
reason, before any of it reaches alignment or training; real summaries pass."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from node.errors import UserError
from node.fusion.corpus import write_toy_corpus
from node.fusion.summaries import SummarySettings, summarize
from node.fusion.summary_check import SummaryContentError, check_shard
from node.fusion.summary_store import FORMAT, SummaryReader, file_sha256
from node.rounds import fuse_data

Arrays = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory, gpt2_family: Any) -> Path:
    tmp = tmp_path_factory.mktemp("check")
    corpus = write_toy_corpus(tmp / "c.jsonl", n=6, seed=5)
    out = tmp / "s"
    settings = SummarySettings(top_k=4, max_len=64, shard_size=3, batch_size=3)
    summarize(gpt2_family.base, corpus, out, settings, progress=False)
    return out


def shard(summary: Path) -> tuple[Arrays, int, int]:
    mf = json.loads((summary / "manifest.json").read_text())
    return load_file(str(summary / mf["shards"][0]["file"])), mf["vocab_size"], mf["n_seqs"]


def _set(name: str, index: Any, value: Any) -> Callable[[Arrays], None]:
    def f(a: Arrays) -> None:
        a[name] = a[name].copy()
        a[name][index] = value

    return f


def _drop(name: str) -> Callable[[Arrays], None]:
    def f(a: Arrays) -> None:
        del a[name]

    return f


def _astype(name: str, dtype: Any) -> Callable[[Arrays], None]:
    def f(a: Arrays) -> None:
        a[name] = a[name].astype(dtype)

    return f


CASES: dict[str, tuple[Callable[[Arrays], None], str]] = {
    "NaN log-probability": (_set("topk_logp", (0, 0), np.nan), "not finite"),
    "positive log-probability": (_set("topk_logp", (1, 0), 3.0), "above 0"),
    "negative NLL": (_set("token_nll", 0, -1.0), "negative"),
    "infinite sequence CE": (_set("seq_ce", 0, np.inf), "not finite"),
    "top-k id past the vocabulary": (_set("topk_ids", (0, 1), 1000), "vocabulary size"),
    "missing array": (_drop("offsets"), "missing"),
    "float ids": (_astype("topk_ids", np.float32), "not an integer"),
    "pointer past the end": (_set("tok_ptr", -1, 10_000), "tok_ptr"),
    "decreasing pointer": (_set("pred_ptr", 1, 0), "one prediction per token"),
    "repeated sequence": (_set("seq_index", 1, 0), "repeated"),
    "sequence past the corpus": (_set("seq_index", 0, 99), "outside"),
    "span ending before it starts": (_set("offsets", (2, 0), 250), "span"),
}


def test_real_summaries_pass(summary: Path) -> None:
    a, vocab, n = shard(summary)
    check_shard(a, vocab, n)
    fuse_data.check_packed(summary)


@pytest.mark.parametrize("case", sorted(CASES))
def test_impossible_content_is_refused(summary: Path, case: str) -> None:
    a, vocab, n = shard(summary)
    assert vocab < 1000  # the tiny test tokenizer: 1000 is past it
    mutate, reason = CASES[case]
    mutate(a)
    with pytest.raises(SummaryContentError, match=reason):
        check_shard(a, vocab, n)


def test_reader_and_round_refuse_a_rehashed_bad_shard(tmp_path: Path, summary: Path) -> None:
    bad = shutil.copytree(summary, tmp_path / "bad")
    fuse_data.poison(bad)  # NaN written, manifest hash updated: only the content check sees it
    with pytest.raises(UserError) as err:
        SummaryReader(bad)
    assert err.value.field == "--summaries" and "not finite" in str(err.value)
    with pytest.raises(SummaryContentError, match="not finite"):
        fuse_data.check_packed(bad)
    mf = json.loads((bad / "manifest.json").read_text())
    assert mf["shards"][0]["sha256"] == file_sha256(bad / mf["shards"][0]["file"])
    mf["format"] = "other"
    (bad / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(SummaryContentError, match=f"not {FORMAT}"):
        fuse_data.check_packed(bad)


def test_combine_refuses_bad_content(tmp_path: Path, summary: Path) -> None:
    bad = shutil.copytree(summary, tmp_path / "bad")
    f = bad / json.loads((bad / "manifest.json").read_text())["shards"][0]["file"]
    a = load_file(str(f))
    a["topk_ids"][0, 0] = 1000
    save_file(a, str(f), metadata={"format": FORMAT})
    with pytest.raises(SummaryContentError, match="vocabulary size"):
        fuse_data.combine([bad], tmp_path / "combined", "0" * 64)
    assert not (tmp_path / "combined").exists()
