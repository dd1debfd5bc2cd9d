"""Fusion functions, the sparse loss, and `unode fuse` runs on tiny heterogeneous models."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from node.errors import UserError
from node.fusion.corpus import write_toy_corpus
from node.fusion.dataset import build_dataset
from node.fusion.fuse_fns import avg_ce, avg_ce_token, min_ce, min_ce_token
from node.fusion.loss import clm_and_fusion, dense_fusion_loss
from node.fusion.summaries import SummarySettings, summarize
from node.fusion.train import FuseConfig, fuse

SETTINGS = SummarySettings(top_k=8, max_len=96, shard_size=16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, llama_family: Any, gpt2_family: Any) -> Any:
    """Corpus, a Llama target (BPE) and a GPT-2 source (unigram, other size), both summarised."""
    root = tmp_path_factory.mktemp("fuse")
    corpus = write_toy_corpus(root / "c.jsonl", n=24, seed=5)
    s_src, s_tgt = root / "s_src", root / "s_tgt"
    summarize(gpt2_family.base, corpus, s_src, SETTINGS, progress=False)
    summarize(llama_family.base, corpus, s_tgt, SETTINGS, progress=False)
    cfg = FuseConfig(
        target=llama_family.base,
        summaries=[s_src, s_tgt],
        corpus=corpus,
        out=root / "unused",
        lr=3e-3,
        warmup=2,
        batch_size=4,
        max_len=96,
        cache_dir=root / "cache",
        progress=False,
    )
    return cfg


def _cands() -> tuple[torch.Tensor, ...]:
    ids = torch.tensor([[[[1, 2]], [[3, 4]]], [[[5, 6]], [[7, 8]]]])  # (C=2, B=1, T=2, k=2)
    ids = ids.reshape(2, 1, 2, 2)
    probs = torch.tensor([0.75, 0.25]).expand(2, 1, 2, 2).clone()
    seq_ce = torch.tensor([[2.0], [1.0]])  # candidate 1 is better on the sequence
    tok_ce = torch.tensor([[[0.5, 3.0]], [[1.0, 1.0]]])  # candidate 0 better at position 0
    return ids, probs, seq_ce, tok_ce


def test_min_ce_picks_the_lowest_sequence_ce() -> None:
    ids, probs, seq_ce, tok_ce = _cands()
    out_ids, out_probs = min_ce(ids, probs, seq_ce, tok_ce)
    assert out_ids.tolist() == [[[5, 6], [7, 8]]]
    assert out_probs.tolist() == [[[0.75, 0.25], [0.75, 0.25]]]


def test_min_ce_token_picks_per_position() -> None:
    ids, probs, seq_ce, tok_ce = _cands()
    out_ids, _ = min_ce_token(ids, probs, seq_ce, tok_ce)
    assert out_ids.tolist() == [[[1, 2], [7, 8]]]


def test_avg_ce_weights_are_fusellm_softmax_of_exp_minus_ce() -> None:
    ids, probs, seq_ce, tok_ce = _cands()
    out_ids, out_probs = avg_ce(ids, probs, seq_ce, tok_ce)
    w0 = math.exp(math.exp(-2)) / (math.exp(math.exp(-2)) + math.exp(math.exp(-1)))
    assert out_ids.tolist() == [[[1, 2, 5, 6], [3, 4, 7, 8]]]
    expected = [0.75 * w0, 0.25 * w0, 0.75 * (1 - w0), 0.25 * (1 - w0)]
    assert out_probs[0, 0].tolist() == pytest.approx(expected, abs=1e-6)
    assert float(out_probs[0, 1].sum()) == pytest.approx(1.0)
    _, tok_probs = avg_ce_token(ids, probs, seq_ce, tok_ce)
    w_tok = math.exp(math.exp(-0.5)) / (math.exp(math.exp(-0.5)) + math.exp(math.exp(-1.0)))
    assert float(tok_probs[0, 0, :2].sum()) == pytest.approx(w_tok, abs=1e-6)


def test_sparse_fusion_loss_equals_the_dense_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 40, generator=gen, requires_grad=True)
    ids = torch.randint(0, 40, (2, 5, 6), generator=gen)
    ids[0, 1, 3:] = -1  # empty slots
    ids[1, 2, 1] = ids[1, 2, 0]  # a duplicate id (two source tokens mapped to one target)
    probs = torch.rand(2, 5, 6, generator=gen) * (ids >= 0)
    probs = probs / probs.sum(-1, keepdim=True)
    labels = torch.randint(0, 40, (2, 5), generator=gen)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    clm, sparse = clm_and_fusion(logits, labels, ids, probs, mask)
    dense = dense_fusion_loss(logits, ids, probs, mask)
    assert float(sparse.detach()) == pytest.approx(float(dense.detach()), abs=1e-5)
    g_sparse = torch.autograd.grad(sparse, logits)[0]
    g_dense = torch.autograd.grad(dense_fusion_loss(logits, ids, probs, mask), logits)[0]
    assert torch.allclose(g_sparse, g_dense, atol=1e-6)
    ref = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    assert float(clm.detach()) == pytest.approx(float(ref.detach()), abs=1e-5)


def test_dataset_diagnostics_and_response_mask(env: Any, bpe_tokenizer: Any) -> None:
    data, reports = build_dataset(
        bpe_tokenizer, env.corpus, env.summaries, 96, response_only=True, cache_dir=env.cache_dir,
        progress=False,
    )  # fmt: skip
    src, own = reports[0].diagnostics, reports[1].diagnostics
    assert 0.2 < src["share_one_to_one"] < 1.0 and own["share_one_to_one"] == 1.0
    assert src["share_one_to_one"] + src["share_one_hot"] + src["share_uncovered"] == pytest.approx(
        1
    )
    assert 0.0 < src["mass_kept"] <= 1.0
    ex = data[0]
    assert 0 < ex.mask.sum() < len(ex.mask)  # prompt rows are masked out
    # one-hot fallbacks sit on the label (next token), never on the current token
    cand = ex.cands[0]
    onehot = np.nonzero(cand.probs[:, 0] == 1.0)[0]
    assert len(onehot) and (cand.ids[onehot, 0] == ex.ids[onehot + 1]).all()


def test_dp_alignment_and_stats_mapping_give_a_close_dataset(env: Any, bpe_tokenizer: Any) -> None:
    kw: dict[str, Any] = dict(cache_dir=env.cache_dir, progress=False)
    _, by_spans = build_dataset(bpe_tokenizer, env.corpus, env.summaries, 96, **kw)
    data, by_dp = build_dataset(
        bpe_tokenizer, env.corpus, env.summaries, 96, vocab_method="stats", alignment="dp", **kw
    )
    a, b = by_spans[0].diagnostics, by_dp[0].diagnostics
    assert abs(a["share_one_to_one"] - b["share_one_to_one"]) < 0.1
    assert by_dp[1].diagnostics["share_one_to_one"] == 1.0  # identical tokenizer: identity
    assert all(np.allclose(c.probs.sum(1), 1.0, atol=1e-5) for ex in data for c in ex.cands)


def test_source_without_offsets_is_aligned_by_dp(
    env: Any, tmp_path: Path, bpe_tokenizer: Any
) -> None:
    """A byte-per-token Python tokenizer (ByT5's) gives no offsets: the DP takes over."""
    from transformers import ByT5Tokenizer

    from node import toymodels
    from node.fusion.summary_store import SummaryReader

    model = toymodels.build_model(tmp_path / "byt5", "llama", ByT5Tokenizer(), hidden=32, layers=2)
    summarize(model, env.corpus, tmp_path / "s", SummarySettings(top_k=4, max_len=200))
    assert not SummaryReader(tmp_path / "s").has_offsets
    kw: dict[str, Any] = dict(cache_dir=env.cache_dir, progress=False)
    data, reports = build_dataset(bpe_tokenizer, env.corpus, [tmp_path / "s"], 96, **kw)
    diag = reports[0].diagnostics
    assert diag["share_one_to_one"] > 0.1 and diag["share_uncovered"] > 0.0
    # rows that got the source's distribution hold valid target ids wherever they hold mass
    cand = data[0].cands[0]
    rows = np.nonzero(cand.probs[:, 0] < 1.0)[0]
    held = cand.probs[rows] > 0
    assert len(rows) and (cand.ids[rows][held] >= 0).all()
    assert (cand.ids[rows][held] < len(bpe_tokenizer)).all()


def test_training_lowers_the_fusion_loss_and_output_loads(env: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = fuse(replace(env, out=tmp_path / "fused", lam=0.0, max_steps=12))
    assert out is not None and not (tmp_path / "fused.work").exists()
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["eval_after"]["fusion"] < lineage["eval_before"]["fusion"] - 0.1
    assert [s["path"] for s in lineage["sources"]] == [str(p) for p in env.summaries]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    model: Any = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    gen = model.generate(
        tok("What is", return_tensors="pt").input_ids, max_new_tokens=5, do_sample=False
    )
    assert gen.shape[1] > 2


def test_resume_gives_the_same_state_as_an_uninterrupted_run(env: Any, tmp_path: Path) -> None:
    base = replace(env, lam=0.5, max_steps=6, grad_accum=2, save_every=100)
    whole = fuse(replace(base, out=tmp_path / "whole"))
    assert fuse(replace(base, out=tmp_path / "split", stop_after=3)) is None
    assert (tmp_path / "split.work" / "checkpoint" / "optimizer.safetensors").exists()
    split = fuse(replace(base, out=tmp_path / "split", resume=True))
    assert whole is not None and split is not None
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = (whole / "train_log.jsonl").read_text().splitlines()
    log_b = (split / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in log_a] == [json.loads(x)["loss"] for x in log_b]


def test_bf16_and_token_level_fusion_run(env: Any, tmp_path: Path) -> None:
    out = fuse(replace(env, out=tmp_path / "bf", bf16=True, fusion="avg_ce_token", max_steps=2))
    assert out is not None and (out / "config.json").exists()


def test_target_tokenizer_missing_the_corpus_characters_is_refused(
    env: Any, tmp_path: Path, llama_family: Any, gpt2_family: Any
) -> None:
    jp = tmp_path / "jp.txt"
    jp.write_text("日本語のテキスト。\n\n漢字とかな。")
    summarize(llama_family.base, jp, tmp_path / "s", SETTINGS, progress=False)  # byte-level: ok
    with pytest.raises(UserError, match="unknown to the model's tokenizer"):
        fuse(replace(env, target=gpt2_family.base, summaries=[tmp_path / "s"], corpus=jp,
                     out=tmp_path / "o"))  # fmt: skip
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.work").exists()


def test_bad_inputs_are_refused_before_writing(env: Any, tmp_path: Path) -> None:
    other = write_toy_corpus(tmp_path / "other.jsonl", n=24, seed=99)
    with pytest.raises(UserError, match="another corpus"):
        fuse(replace(env, corpus=other, out=tmp_path / "x"))
    with pytest.raises(UserError, match="--lam"):
        fuse(replace(env, lam=1.5, out=tmp_path / "x"))
    with pytest.raises(UserError, match="--fusion"):
        fuse(replace(env, fusion="max", out=tmp_path / "x"))
    (tmp_path / "x.work").mkdir()
    with pytest.raises(UserError, match="--resume"):
        fuse(replace(env, out=tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_cli_summarize_and_fuse(env: Any, tmp_path: Path, gpt2_family: Any) -> None:
    from typer.testing import CliRunner

    from cli import app

    runner = CliRunner()
    s = tmp_path / "s"
    res = runner.invoke(app, ["summarize", "--model", str(gpt2_family.base), "--corpus",
                              str(env.corpus), "--out", str(s), "--top-k", "4", "--max-len", "64",
                              "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((s / "manifest.json").read_text())["settings"]["top_k"] == 4
    args = ["fuse", "--target", str(env.target), "--summaries", str(s), "--corpus",
            str(env.corpus), "--max-steps", "2", "--max-len", "64", "-q"]  # fmt: skip
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "f" / "lineage.json").exists()
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "g"), "--lam", "2"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "--lam" in res.output


def test_fusechat_pairwise_then_sce_merge(env: Any, tmp_path: Path, llama_family: Any) -> None:
    from transformers import AutoModelForCausalLM

    from node.fusion.pairwise import fuse_pairwise, split_summaries

    s_var = tmp_path / "s_var"  # a second source: a fine-tune-like variant (same tokenizer)
    summarize(llama_family.variants[0], env.corpus, s_var, SETTINGS, progress=False)
    sums = [*env.summaries, s_var]
    own, others = split_summaries(env.target, sums)
    assert own == [env.summaries[1]] and others == [env.summaries[0], s_var]
    with pytest.raises(UserError, match="--sce-topk"):
        fuse_pairwise(replace(env, out=tmp_path / "x"), select_topk=0.5)
    out = fuse_pairwise(replace(env, summaries=sums, out=tmp_path / "chat", max_steps=3), 0.5)
    assert out is not None and not (tmp_path / "chat.work").exists()
    lineage = json.loads((out / "fusion_lineage.json").read_text())
    assert lineage["kind"] == "fusechat" and len(lineage["pairs"]) == 2
    pair_sources = [s["path"] for s in lineage["pairs"][0]["sources"]]
    assert pair_sources == [str(env.summaries[1]), str(env.summaries[0])]
    merged = AutoModelForCausalLM.from_pretrained(out)
    pivot = AutoModelForCausalLM.from_pretrained(env.target)
    w_m, w_p = merged.state_dict(), pivot.state_dict()
    assert any(not torch.equal(w_m[k], w_p[k]) for k in w_p)


def test_combined_loss_matches_the_simple_one_in_value_and_gradient() -> None:
    from node.fusion.loss import combined_loss

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 30, generator=gen, requires_grad=True)
    ids = torch.randint(-1, 30, (2, 5, 4), generator=gen)
    probs = torch.rand(2, 5, 4, generator=gen) * (ids >= 0)
    labels = torch.randint(0, 30, (2, 5), generator=gen)
    mask = torch.rand(2, 5, generator=gen) > 0.3
    clm, fus = clm_and_fusion(logits[:, :-1], labels, ids, probs, mask)
    simple = 0.7 * clm + 0.3 * fus
    fused, clm_value, fusion_value = combined_loss(logits, labels, ids, probs, mask, 0.7)
    assert float(fused.detach()) == pytest.approx(float(simple.detach()), abs=1e-5)
    assert clm_value == pytest.approx(float(clm.detach()), abs=1e-5)
    assert fusion_value == pytest.approx(float(fus.detach()), abs=1e-5)
    g_simple = torch.autograd.grad(simple, logits)[0]
    g_fused = torch.autograd.grad(fused, logits)[0]
    assert torch.allclose(g_simple, g_fused, atol=1e-6)
    assert (g_fused[:, -1] == 0).all()  # the last position predicts nothing


def test_text_records_are_taken_as_they_are(tmp_path: Path) -> None:
    from node.fusion.corpus import load_corpus

    path = tmp_path / "c.jsonl"
    lines = [{"text": "Q: 7*8= A: 56\n"}, {"instruction": "Add", "response": "5", "text": "x"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    plain, templated = load_corpus(path)
    assert plain.text == "Q: 7*8= A: 56\n" and plain.response_start == 0
    assert templated.text.startswith("### Instruction:\nAdd") and templated.text.endswith("5")
    assert templated.text[templated.response_start :] == "5"
