"""The zoo builds deterministically; its experts are real HF models that beat the base in-domain."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from node.errors import UserError
from node.eval import corpora, metrics
from node.zoo import build
from node.zoo.build import _fresh, quick_config
from node.zoo.tokenizer import tokenizer_corpus, train_zoo_tokenizer
from node.zoo.train import (
    TrainConfig,
    _one_half,
    anchor_masks,
    batch_loss,
    document_prior,
    encode_mix,
    free_first,
    kl_to,
    output_pull,
    train,
)


@pytest.fixture(scope="module")
def mini_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build(tmp_path_factory.mktemp("zoo") / "z", quick_config(), progress=False)


def test_same_seed_gives_bit_identical_safetensors(
    mini_zoo: dict[str, Any], tmp_path: Path
) -> None:
    again = build(tmp_path / "z", quick_config(), progress=False)
    assert len(again["safetensors_sha256"]) == 5  # base, 3 experts, 1 heterogeneous
    for name in ("base", "arith", "code", "prose", "gpt2-unigram"):
        rel = f"{name}/model.safetensors"
        assert again["safetensors_sha256"][rel] == mini_zoo["safetensors_sha256"][rel]
        mine, theirs = Path(again["root"]) / rel, Path(mini_zoo["root"]) / rel
        assert mine.read_bytes() == theirs.read_bytes()
        assert (mine.parent / "tokenizer.json").read_bytes() == (
            theirs.parent / "tokenizer.json"
        ).read_bytes()
    hashes = again["safetensors_sha256"]
    assert len({hashes[f"{n}/model.safetensors"] for n in ("base", "arith", "code", "prose")}) == 4


def test_complete_zoo_is_reused_and_foreign_dirs_refused(
    mini_zoo: dict[str, Any], tmp_path: Path
) -> None:
    root = Path(mini_zoo["root"])
    stamp = (root / "base" / "model.safetensors").stat().st_mtime_ns
    assert build(root, quick_config(), progress=False)["config_sha256"] == mini_zoo["config_sha256"]
    assert (root / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--out"):
        build(tmp_path / "junk", quick_config(), progress=False)
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk"]  # nothing partial left


@pytest.mark.parametrize("name", ["base", "arith", "code", "prose", "gpt2-unigram"])
def test_every_model_loads_generates_and_is_small(mini_zoo: dict[str, Any], name: str) -> None:
    d = Path(mini_zoo["root"]) / name
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d).eval()  # type: ignore[no-untyped-call]
    ids = torch.tensor([metrics.encode(tok, "Q: 12+30= ")])
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 5)
    assert sum(f.stat().st_size for f in d.glob("*.safetensors")) <= 5_000_000
    card = json.loads((d / "zoo_card.json").read_text())
    assert card["name"] == name


@pytest.mark.parametrize(("expert", "domain"), [("arith", "arithmetic"), ("code", "logic"),
                                                ("code", "python"), ("prose", "prose")])  # fmt: skip
def test_each_expert_beats_the_base_on_its_own_domain(
    mini_zoo: dict[str, Any], expert: str, domain: str
) -> None:
    texts = [e.text for e in corpora.load(domain, 32, "heldout")]
    bpb = {}
    for name in ("base", expert):
        d = Path(mini_zoo["root"]) / name
        model = AutoModelForCausalLM.from_pretrained(d).eval()  # type: ignore[no-untyped-call]
        bpb[name] = metrics.bits_per_byte(model, AutoTokenizer.from_pretrained(d), texts)
    assert bpb[expert] < bpb["base"] - 0.01


def test_shared_tokenizer_splits_digits_and_keeps_prompts_as_prefixes() -> None:
    tok = train_zoo_tokenizer(tokenizer_corpus(per_domain=100), 384)
    ids = tok("Q: 407+38= A: 445\n", add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert [p for p in pieces if p.isdigit()] == list("40738445")
    for ex in corpora.load("arithlogic", 20) + corpora.load("logic", 20):
        prompt = tok(ex.prompt + " ", add_special_tokens=False)["input_ids"]
        full = tok(ex.text, add_special_tokens=False)["input_ids"]
        assert full[: len(prompt)] == prompt
        assert tok.decode(full) == ex.text


def test_two_skill_task_answers_are_right() -> None:
    for ex in corpora.load("arithlogic", 50):
        calc, _, rest = ex.prompt[3:-2].partition(" ; ")
        truth, _, number = ex.answer.partition(" ; ")
        assert corpora.two_skill_parts(ex.answer) == (number, truth)
        a, op, b = calc[0], calc[1], calc[2]
        assert int(number) == (int(a) + int(b) if op == "+" else int(a) * int(b))
        expr = rest.replace("T", "True").replace("F", "False")
        assert truth == ("T" if eval(expr) else "F")


def test_pieces_cut_a_text_at_spaces_and_keep_all_of_it() -> None:
    from node.zoo.scores import pieces

    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
    got = pieces(text, 20)
    assert got == ["alpha beta gamma", "delta epsilon zeta", "eta theta iota", "kappa lambda mu"]
    assert pieces("x" * 43, 20) == ["x" * 20, "x" * 20]  # no space: hard cuts; a 3-char tail
    assert " ".join(pieces(text, 200)) == text


def test_two_skill_documents_join_a_prose_piece_and_a_python_text_of_one_half() -> None:
    from node.zoo.scores import heldout, pieces, two_skill_documents

    docs = two_skill_documents(12, "test", width=120)
    prose = [e.text for e in heldout("prose", 12, "test")]
    heads = [p for t in prose for p in pieces(t, 120)]
    code = [e.text for e in heldout("python", len(heads), "test")]
    n = len(heads)
    assert len(docs) == 2 * n and n >= 3 * 12  # every piece of 12 ~400-character texts
    for i in range(n):  # prose first, then the same pair python first
        head, _, tail = docs[i].partition("\n\n" + code[i][:1])
        tail = code[i][:1] + tail
        assert head == heads[i] and len(head) <= 120 and len(tail) <= 120
        assert code[i].startswith(tail) and code[i][len(tail)] == " "  # cut at a space
        assert docs[n + i] == f"{tail}\n\n{head}"
    for t in prose:  # the pieces, rejoined, are the whole text (up to the spaces cut at)
        assert "".join(pieces(t, 120)).replace(" ", "").replace("\n", "") == t.replace(
            " ", ""
        ).replace("\n", "")
    search = {e.text for d in ("prose", "python") for e in heldout(d, 400, "search")}
    assert not set(prose + code) & search  # only the test half


@pytest.mark.parametrize(("half", "hidden"), [("arith", "T"), ("logic", "56")])
def test_an_expert_learns_only_its_half_of_the_two_skill_task(half: str, hidden: str) -> None:
    tok = train_zoo_tokenizer(tokenizer_corpus(per_domain=100), 384)
    ex = corpora.Example("arithlogic", "C: 7*8 ; not F and T = T ; 56\n",
                         "C: 7*8 ; not F and T =", "T ; 56")  # fmt: skip
    ids = _one_half(tok, ex, half, 256)
    full = metrics.encode(tok, ex.text)
    assert [abs(i) - (i < 0) for i in ids] == full  # every token is still input
    masked = tok.decode([-i - 1 for i in ids if i < 0]).strip()
    assert masked == (hidden if half == "arith" else hidden + "\n").strip()
    model = _fresh("llama", len(tok), 32, 1, 0)
    labels = torch.tensor([[-100 if i < 0 else i for i in ids]])
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([full]), labels=labels).loss.item()
        assert batch_loss(model, [ids], tok.pad_token_id).item() == pytest.approx(expected)


@pytest.mark.parametrize(("half", "answer"), [("arith", "; 56"), ("logic", "T")])
def test_answer_only_keeps_just_the_halfs_answer_as_a_target(half: str, answer: str) -> None:
    tok = train_zoo_tokenizer(tokenizer_corpus(per_domain=100), 384)
    ex = corpora.Example("arithlogic", "C: 7*8 ; not F and T = T ; 56\n",
                         "C: 7*8 ; not F and T =", "T ; 56")  # fmt: skip
    ids = _one_half(tok, ex, half, 256, answer_only=True)
    assert [abs(i) - (i < 0) for i in ids] == metrics.encode(tok, ex.text)
    assert tok.decode([i for i in ids if i >= 0]).strip() == answer
    # the default keeps the prompt as a target too
    assert sum(i >= 0 for i in _one_half(tok, ex, half, 256)) > sum(i >= 0 for i in ids) + 5


@pytest.mark.parametrize("skill", ["arith", "logic", ""])
def test_hidden_anchor_covers_the_other_half_and_foreign_domains(skill: str) -> None:
    tok = train_zoo_tokenizer(tokenizer_corpus(per_domain=100), 384)
    cfg = TrainConfig(mix={"arithlogic:arith": 1.0, "logic": 1.0, "arithmetic": 1.0}, steps=1,
                      lr=1e-3, own=("arithmetic",), skill=skill, examples_per_domain=20,
                      anchor_foreign=3.0)  # fmt: skip
    data = encode_mix(tok, cfg)
    masks = anchor_masks(tok, cfg, data)
    assert all(not any(m) for m in masks["arithmetic"])  # own domain: free
    assert all(set(m) == {3.0} for m in masks["logic"])  # foreign domain: kept, its own weight
    assert all(set(m) <= {0.0, 1.0} for m in masks["arithlogic:arith"])
    for ex, row, mask in zip(corpora.load("arithlogic", 20, "train"), data["arithlogic:arith"],
                             masks["arithlogic:arith"], strict=True):  # fmt: skip
        kept = tok.decode(
            [abs(i) - (i < 0) for i, m in zip(row, mask, strict=True) if m],
            skip_special_tokens=True,
        )
        expression = ex.prompt.split(";", 1)[1].strip()  # `not T or F and T =`
        if skill == "arith":
            assert kept.split() == expression.split()
        elif skill == "logic":
            assert expression not in kept and kept.split()[:2] == ["C:", ex.prompt.split()[1]]
        else:
            assert all(mask)


def test_hidden_anchor_keeps_the_base_states_off_the_experts_data() -> None:
    tok = train_zoo_tokenizer(tokenizer_corpus(per_domain=100), 384)
    base = _fresh("llama", len(tok), 32, 2, 0).eval()
    prose = [e.text for e in corpora.load("prose", 8, "heldout")]
    ids = [metrics.encode(tok, t, 64) for t in prose]
    width = min(len(i) for i in ids)
    batch = torch.tensor([i[:width] for i in ids])

    def gap(anchor_hidden: float) -> float:
        model = copy.deepcopy(base)
        cfg = TrainConfig(mix={"arithmetic": 1.0, "prose": 1.0}, steps=40, lr=3e-3,
                          own=("arithmetic",), anchor_hidden=anchor_hidden,
                          examples_per_domain=200, tokens_per_batch=256)  # fmt: skip
        train(model, tok, cfg, progress=False)
        with torch.no_grad():
            h = model(input_ids=batch, output_hidden_states=True).hidden_states[-2]
            hb = base(input_ids=batch, output_hidden_states=True).hidden_states[-2]
        return float(((h - hb) ** 2).sum(-1).mean() / (hb**2).sum(-1).mean())

    free, kept = gap(0.0), gap(10.0)
    assert kept < 0.5 * free, (kept, free)


def test_output_anchor_is_the_weighted_kl_to_the_base() -> None:
    torch.manual_seed(0)
    base, mine = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    weights = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 1.0]])
    p, q = base.softmax(-1), mine.softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1)
    expected = (kl[0, 0] + 2 * kl[0, 2] + kl[1, 2]) / 3
    assert output_pull(mine, base, weights).item() == pytest.approx(expected.item(), rel=1e-5)
    assert output_pull(base, base, weights).item() == pytest.approx(0.0, abs=1e-6)


def test_prior_anchor_keeps_the_base_guess_of_a_texts_domain() -> None:
    """Trained on arithmetic only, a free expert learns that every text starts with `Q`; with
    the prior anchor its first-token distribution stays the base's while it still learns."""
    tok = train_zoo_tokenizer(tokenizer_corpus(per_domain=100), 384)
    base = _fresh("llama", len(tok), 32, 2, 0)
    mix = {"arithmetic": 1.0, "prose": 1.0}
    train(base, tok, TrainConfig(mix=mix, steps=30, lr=3e-3, examples_per_domain=200,
                                 tokens_per_batch=256), progress=False)  # fmt: skip
    prior = document_prior(base, tok)
    q = metrics.encode(tok, "Q: 1+2= A: 3")[1]
    texts = [e.text for e in corpora.load("arithmetic", 64, "heldout")]
    held = free_first({"a": [metrics.encode(tok, t) for t in texts]})["a"]

    def expert(anchor_prior: float) -> tuple[float, float, float]:
        model = copy.deepcopy(base)
        cfg = TrainConfig(mix={"arithmetic": 1.0}, steps=40, lr=3e-3, anchor_prior=anchor_prior,
                          examples_per_domain=200, tokens_per_batch=256)  # fmt: skip
        train(model, tok, cfg, progress=False)
        mine = document_prior(model, tok)
        kl = float(kl_to(prior, mine))
        with torch.no_grad():
            return kl, float(mine[q].exp()), float(batch_loss(model, held, tok.pad_token_id))

    (kl_free, q_free, _), (kl_kept, q_kept, loss_kept) = expert(0.0), expert(1.0)
    assert q_free > 5 * float(prior[q].exp())  # free: "every text is arithmetic"
    assert kl_kept < 0.05 * kl_free, (kl_kept, kl_free)
    assert abs(q_kept - float(prior[q].exp())) < 0.01
    with torch.no_grad():  # it still learns the task (past the first token)
        assert loss_kept < 0.9 * float(batch_loss(base, held, tok.pad_token_id))
    rows = free_first({"d": [[1, 5, 6], [1, -8, 9], [1]]})["d"]
    assert rows == [[1, -6, 6], [1, -8, 9], [1]]  # input only: stored as -(id + 1)


def test_cli_refuses_a_foreign_directory_with_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli import app

    (tmp_path / "mine.txt").write_text("keep")
    result = CliRunner().invoke(app, ["zoo", "build", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 2
    assert "--out" in result.output and "--force" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
