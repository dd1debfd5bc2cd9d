"""Corpora splits are deterministic and disjoint; metrics equal direct computations."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from node.errors import UserError
from node.eval import corpora, metrics


@pytest.mark.parametrize("domain", corpora.DOMAINS)
def test_splits_are_disjoint_and_deterministic(domain: str) -> None:
    train = corpora.load(domain, 40, "train")
    held = corpora.load(domain, 20, "heldout")
    assert len(train) == 40 and len(held) == 20
    assert not {e.text for e in train} & {e.text for e in held}
    assert [e.text for e in corpora.load(domain, 40, "train")] == [e.text for e in train]


def test_generated_answers_are_correct() -> None:
    for ex in corpora.arithmetic(50):
        a, op, b = ex.prompt[3], ex.prompt[4], ex.prompt[5]
        assert int(ex.answer[3:]) == (int(a) + int(b) if op == "+" else int(a) * int(b))
    for ex in corpora.logic(50):
        expr = ex.prompt[3:-2].replace("T", "True").replace("F", "False")
        assert ex.answer == ("T" if eval(expr) else "F")


def test_logic_has_many_expressions_and_both_values() -> None:
    items = corpora.logic(3000)
    assert len({e.prompt for e in items}) >= 200  # 256 expressions: too many to memorise
    assert 0.35 < sum(e.answer == "T" for e in items) / len(items) < 0.65


def test_unknown_domain_is_a_user_error() -> None:
    with pytest.raises(UserError, match="domain"):
        corpora.load("chemistry", 3)


@pytest.mark.parametrize(
    "gen",
    corpora.GENERATORS.values(),
    ids=lambda g: g.__name__,
)
def test_a_split_that_is_not_train_or_heldout_is_refused(gen: Any) -> None:
    """No item ever falls in such a split: the generator would loop forever."""
    with pytest.raises(ValueError, match="use 'train' or 'heldout'"):
        gen(2, "test")


def test_bits_per_byte_matches_the_model_loss(llama_family: Any) -> None:
    tok = AutoTokenizer.from_pretrained(llama_family.base)
    model = AutoModelForCausalLM.from_pretrained(llama_family.base).eval()  # type: ignore[no-untyped-call]
    text = "Q: 12+30= A: 42\n"
    ids = torch.tensor([metrics.encode(tok, text)])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()  # mean over T-1 targets
    expected = loss * (ids.shape[1] - 1) / math.log(2) / len(text.encode())
    assert metrics.bits_per_byte(model, tok, [text]) == pytest.approx(expected, rel=1e-4)
    # batching with padding must not change the figure
    texts = [text, "a much longer second text that forces padding of the first one"]
    each = [metrics.bits_per_byte(model, tok, [t]) for t in texts]
    sizes = [len(t.encode()) for t in texts]
    pooled = sum(b * s for b, s in zip(each, sizes, strict=True)) / sum(sizes)
    assert metrics.bits_per_byte(model, tok, texts) == pytest.approx(pooled, rel=1e-4)


def test_bits_per_byte_past_the_window_counts_only_the_bytes_it_scored(llama_family: Any) -> None:
    """A text cut at the 256-token window is divided by the bytes of its kept tokens, not by
    the whole text's (which would flatter a tokenizer that packs fewer bytes per token)."""
    tok = AutoTokenizer.from_pretrained(llama_family.base)
    model = AutoModelForCausalLM.from_pretrained(llama_family.base).eval()  # type: ignore[no-untyped-call]
    text = " ".join(f"item {i} costs {3 * i} coins;" for i in range(200))
    ids = metrics.encode(tok, text)
    assert len(ids) == 256 and len(tok(text, add_special_tokens=False)["input_ids"]) > 256
    covered = metrics.encode_scored(tok, text)[1]
    assert 0 < covered < len(text.encode())
    assert tok.decode(ids[1:]).strip() == text[:covered].strip()  # exactly the kept tokens' text
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        loss = model(input_ids=ids_t, labels=ids_t).loss.item()
    expected = loss * (len(ids) - 1) / math.log(2) / covered
    assert metrics.bits_per_byte(model, tok, [text]) == pytest.approx(expected, rel=1e-4)
    assert metrics.encode_scored(tok, "short text")[1] == len(b"short text")


def test_bits_per_byte_splits_batches_whose_logits_pass_the_budget(
    llama_family: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large vocabulary runs a few rows at a time, to the same figure."""
    tok = AutoTokenizer.from_pretrained(llama_family.base)
    model = AutoModelForCausalLM.from_pretrained(llama_family.base).eval()  # type: ignore[no-untyped-call]
    texts = [e.text for e in corpora.load("prose", 6, "heldout")]
    whole = metrics.bits_per_byte(model, tok, texts)
    rows_seen: list[int] = []
    forward = model.forward

    def counting(*args: Any, **kw: Any) -> Any:
        rows_seen.append(int(kw["input_ids"].shape[0]))
        return forward(*args, **kw)

    monkeypatch.setattr(model, "forward", counting)
    monkeypatch.setattr(metrics, "LOGITS_BUDGET", 1)  # below one row: one row per pass
    split = metrics.bits_per_byte(model, tok, texts)
    assert rows_seen == [1] * len(texts)
    assert split == pytest.approx(whole, rel=1e-5)


def test_exact_match_scores_the_greedy_answer(llama_family: Any) -> None:
    tok = AutoTokenizer.from_pretrained(llama_family.base)
    model = AutoModelForCausalLM.from_pretrained(llama_family.base).eval()  # type: ignore[no-untyped-call]
    prompt = "Q: 3+4="
    ids = torch.tensor([metrics.encode(tok, prompt + " ")])
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    greedy = str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()
    assert greedy, "the random model must emit something decodable"
    right = corpora.Example("arithmetic", "", prompt=prompt, answer=greedy[:2])
    wrong = corpora.Example("arithmetic", "", prompt=prompt, answer=greedy[:2] + "\u2603")
    assert metrics.exact_match(model, tok, [right]) == 1.0
    assert metrics.exact_match(model, tok, [wrong]) == 0.0


def test_batched_greedy_hits_match_one_prompt_at_a_time(llama_family: Any) -> None:
    # (the random GPT-2 fixture says nothing to these prompts: no verdict to compare)
    tok = AutoTokenizer.from_pretrained(llama_family.base)
    model = AutoModelForCausalLM.from_pretrained(llama_family.base).eval()  # type: ignore[no-untyped-call]
    prompts = [e.prompt for e in corpora.load("logic", 12) + corpora.load("arithmetic", 12)]
    assert len({len(metrics.encode(tok, p + " ")) for p in prompts}) >= 2  # several lengths
    examples, want = [], []
    for i, prompt in enumerate(prompts):  # the answer is the prompt's own greedy text, or not
        ids = torch.tensor([metrics.encode(tok, prompt + " ")])
        out = model.generate(ids, max_new_tokens=3 + i % 3, do_sample=False, pad_token_id=0)
        greedy = str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()
        right = bool(greedy) and i % 2 == 0  # a random model may say nothing at all
        answer = greedy if right else greedy + "\u2603"
        examples.append(corpora.Example("logic", "", prompt=prompt, answer=answer))
        want.append(right)
    assert sum(want) >= 3
    assert metrics.greedy_hits(model, tok, examples, batch_size=1) == want
    assert metrics.greedy_hits(model, tok, examples, batch_size=5) == want
    assert metrics.exact_match(model, tok, examples) == pytest.approx(sum(want) / len(want))


@pytest.mark.parametrize("domain", ["logic", "logic64"])
def test_logic_answers_are_pythons_truth_values(domain: str) -> None:
    for ex in corpora.load(domain, 60) + corpora.load(domain, 20, "heldout"):
        expr = ex.prompt.removeprefix("L: ").removesuffix(" =")
        value = eval(expr.replace("T", "True").replace("F", "False"))  # our own generated text
        assert ex.answer == ("T" if value else "F"), ex.text


def test_two_digit_arithmetic_answers_are_right() -> None:
    for ex in corpora.load("arithmetic2", 60) + corpora.load("arithmetic2", 20, "heldout"):
        expr = ex.prompt.removeprefix("Q: ").removesuffix("=")
        a, op, b = expr.partition("+") if "+" in expr else expr.partition("-")
        value = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert ex.answer == f"A: {value}" and 0 <= value < 199, ex.text


def test_answer_start_with_a_byte_level_bpe_that_folds_the_space() -> None:
    """GPT-2-style tokenizers turn `= T` into `=` + `ĠT`: the answer starts at `ĠT`, not one
    token later (the old `len(encode(prompt + " "))` skipped the whole logic answer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from node.eval.metrics import encode
    from node.zoo.scores import answer_start

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [e.text for e in corpora.load("logic", 300) + corpora.load("arithmetic2", 300)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    fast: Any = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")  # type: ignore[no-untyped-call]
    for ex in corpora.load("logic", 20, "heldout") + corpora.load("arithmetic2", 20, "heldout"):
        full = encode(fast, ex.text.rstrip("\n"))
        start = answer_start(fast, ex, full)
        assert fast.decode(full[start:]).strip() == ex.answer, (ex.text, start)
        assert fast.decode(full[1:start]).strip() == ex.prompt
