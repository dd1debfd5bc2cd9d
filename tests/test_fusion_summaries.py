"""Summary storage: layout, dtypes, values against a direct forward pass, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from node.errors import UserError
from node.fusion.corpus import load_corpus, write_toy_corpus
from node.fusion.summaries import SummarySettings, summarize
from node.fusion.summary_store import SummaryReader, smallest_uint
from node.fusion.tokens import encode

SETTINGS = SummarySettings(top_k=5, temperature=2.0, max_len=96, shard_size=8, batch_size=3)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_corpus(tmp_path_factory.mktemp("corpus") / "c.jsonl", n=20, seed=3)


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory, gpt2_family: Any, corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("summ") / "s"
    summarize(gpt2_family.base, corpus, out, SETTINGS, progress=False)
    return out


def test_smallest_uint() -> None:
    assert smallest_uint(255) is np.uint8 and smallest_uint(256) is np.uint16
    assert smallest_uint(65535) is np.uint16 and smallest_uint(65536) is np.uint32


def test_layout_has_no_padding_and_narrow_dtypes(
    summary: Path, corpus: Path, unigram_tokenizer: Any
) -> None:
    manifest = json.loads((summary / "manifest.json").read_text())
    assert len(manifest["shards"]) == 3 and manifest["n_seqs"] == 20
    texts = [ex.text for ex in load_corpus(corpus)]
    lengths = [len(encode(unigram_tokenizer, t, 96).ids) for t in texts]
    shard = load_file(str(summary / "shard-00000.safetensors"))
    assert shard["input_ids"].dtype == np.uint16 and shard["topk_ids"].dtype == np.uint16
    assert shard["topk_logp"].dtype == np.float16 and shard["topk_logp"].shape[1] == 5
    assert shard["offsets"].dtype in (np.uint8, np.uint16)
    assert shard["seq_index"].tolist() == list(range(8))
    assert len(shard["input_ids"]) == sum(lengths[:8])  # no padding positions
    assert len(shard["topk_ids"]) == sum(n - 1 for n in lengths[:8])


def test_offsets_match_the_tokenizer(summary: Path, corpus: Path, unigram_tokenizer: Any) -> None:
    reader = SummaryReader(summary)
    text = load_corpus(corpus)[11].text
    seq = reader.sequence(11)
    enc = unigram_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    n = len(seq.ids) - 1  # BOS first; truncated at max_len, so maybe no EOS
    assert seq.ids[0] == unigram_tokenizer.bos_token_id
    body = slice(1, min(n + 1, len(enc["input_ids"]) + 1))
    assert seq.ids[body].tolist() == enc["input_ids"][: body.stop - 1]
    assert seq.spans[body].tolist() == [list(o) for o in enc["offset_mapping"][: body.stop - 1]]


def test_values_and_ce_equal_a_direct_forward(summary: Path, gpt2_family: Any) -> None:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(gpt2_family.base)
    model.eval()
    reader = SummaryReader(summary)
    for index in (0, 9, 19):
        seq = reader.sequence(index)
        with torch.no_grad():
            logits = model(torch.from_numpy(seq.ids)[None]).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits, torch.from_numpy(seq.ids[1:]), reduction="none"
        )
        assert seq.ce == pytest.approx(float(nll.mean()), abs=1e-4)
        np.testing.assert_allclose(seq.token_nll, nll.numpy(), atol=1e-2)
        top = torch.log_softmax(logits / 2.0, -1).topk(5, -1)  # stored at temperature 2
        np.testing.assert_allclose(seq.topk_logp, top.values.numpy(), atol=5e-3)
        assert (seq.topk_ids[:, 0] == top.indices[:, 0].numpy()).all()


def test_resume_skips_verified_shards_and_redoes_bad_ones(
    tmp_path: Path, gpt2_family: Any, corpus: Path
) -> None:
    out = tmp_path / "s"
    summarize(gpt2_family.base, corpus, out, SETTINGS, progress=False)
    first = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    keep = (out / "shard-00000.safetensors").stat().st_mtime_ns
    (out / "shard-00002.safetensors").unlink()
    bad = out / "shard-00001.safetensors"
    bad.write_bytes(bad.read_bytes()[:-1] + b"\x00")
    (out / "manifest.json").unlink()
    summarize(gpt2_family.base, corpus, out, SETTINGS, progress=False)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == keep
    assert {p.name: p.read_bytes() for p in out.glob("shard-*")} == first
    SummaryReader(out)  # every hash checks out


def test_reader_rejects_a_tampered_shard(tmp_path: Path, summary: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(summary, copy)
    shard = copy / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-2] + b"\x01\x02")
    with pytest.raises(UserError, match="bad shard hash"):
        SummaryReader(copy)


def test_rerun_with_other_settings_is_refused(
    summary: Path, gpt2_family: Any, corpus: Path
) -> None:
    other = SummarySettings(top_k=3, max_len=96, shard_size=8)
    with pytest.raises(UserError, match="inputs differ"):
        summarize(gpt2_family.base, corpus, summary, other, progress=False)


def test_bad_input_errors_leave_nothing(tmp_path: Path, gpt2_family: Any) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    (tmp_path / "ok.txt").write_text("The text of a passage.")
    with pytest.raises(UserError, match="empty corpus"):
        summarize(gpt2_family.base, empty, tmp_path / "a", SETTINGS, progress=False)
    foreign = tmp_path / "jp.txt"
    foreign.write_text(
        "日本語のテキスト。\n\n漢字とかな。"
    )  # characters the unigram model never saw
    with pytest.raises(UserError, match="unknown to the model's tokenizer"):
        summarize(gpt2_family.base, foreign, tmp_path / "b", SETTINGS, progress=False)
    with pytest.raises(UserError, match="--top-k"):
        summarize(gpt2_family.base, foreign, tmp_path / "c", SummarySettings(top_k=0))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        summarize(gpt2_family.base, empty.with_name("ok.txt"), tmp_path / "busy", SETTINGS)


def test_protocol_summary_manifest(summary: Path) -> None:
    from node.fusion.publish import shard_matches, summary_manifest
    from protocol.records import SummaryManifest

    record = summary_manifest(summary, chunk_size=1 << 12)
    again = SummaryManifest.from_bytes(record.to_bytes())
    assert again == record and record.format == "unode-summaries-1"
    assert [s.n_sequences for s in record.shards] == [8, 8, 4] and record.top_k == 5
    data = (summary / "shard-00001.safetensors").read_bytes()
    assert shard_matches(record, 1, data)
    assert not shard_matches(record, 0, data) and not shard_matches(record, 1, data[:-1] + b"x")
    assert not shard_matches(record, 7, data)
