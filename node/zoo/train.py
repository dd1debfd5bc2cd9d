"""The zoo's training loop: deterministic mixed-domain batches, AdamW with warm-up and cosine
decay, an optional L2-SP pull toward an anchor model, and an optional hidden-state anchor: on
the positions that are not the expert's own (other domains, the other half of a two-skill
prompt) the expert keeps the base's hidden states at every layer, so that two experts' deltas
add without moving what the other's circuits read (the merges then keep both skills). An
optional prior anchor keeps the base's distribution over a text's first token: an expert that
learns "every text is mine" there makes a merge of two experts confidently expect neither.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from node.eval import corpora, metrics


@dataclass(frozen=True)
class TrainConfig:
    """One training run; `mix` gives each domain's share of the batches."""

    mix: Mapping[str, float]
    steps: int
    lr: float
    warmup: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to this share of `lr`
    weight_decay: float = 0.0
    anchor_l2: float = 0.0  # L2-SP: + anchor_l2 * sum((w - w_anchor)^2) over all parameters
    # hidden-state anchor: + anchor_hidden * (mean over anchored positions, summed over layers,
    # of |h - h_base|^2 / mean |h_base|^2); `own` are the domains that are not anchored and
    # `skill` ("arith", "logic" or "") the expert's half of the two-skill prompt
    anchor_hidden: float = 0.0
    anchor_foreign: float = 1.0  # weight of a foreign domain's positions (the other half's: 1)
    anchor_output: float = 0.0  # + this * KL(base || model) of the next-token distributions there
    # document prior: the first token after BOS (which domain a text is) stops being a target
    # and the model keeps the starting model's distribution there (+ this * KL(base || model))
    anchor_prior: float = 0.0
    # two-skill rows (`arithlogic:arith` / `:logic`): only the half's answer is a target (the
    # prompt is input only), as completion-only fine-tuning does
    answer_only: bool = False
    own: tuple[str, ...] = ()
    skill: str = ""
    tokens_per_batch: int = 1024  # short tasks get many examples per batch, prose few
    max_len: int = 192
    seed: int = 0
    examples_per_domain: int = 6000
    label: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)


def _one_half(tokenizer: Any, ex: corpora.Example, half: str, max_len: int,
              answer_only: bool = False) -> list[int]:  # fmt: skip
    """Ids of a two-skill text in which only `half`'s answer (`arith` or `logic`) is a training
    target: the other half's answer tokens are stored as `-(id + 1)` (input, not target), and
    with `answer_only` the prompt's tokens too.
    """
    full = metrics.encode(tokenizer, ex.text, max_len)
    _, truth = corpora.two_skill_parts(ex.answer)
    truth_at = len(metrics.encode(tokenizer, ex.prompt + " "))
    truth_end = len(metrics.encode(tokenizer, f"{ex.prompt} {truth}"))
    if half == "arith":  # the truth value is not a target; the answer is ` ; 56`
        lo, hi = truth_at, truth_end
        keep = range(truth_end, len(full))
    else:  # the number (and what follows) is not a target
        lo, hi = len(metrics.encode(tokenizer, f"{ex.prompt} {truth} ; ")), len(full)
        keep = range(truth_at, truth_end)
    if answer_only:
        return [t if i in keep else -t - 1 for i, t in enumerate(full)]
    return [-t - 1 if lo <= i < hi else t for i, t in enumerate(full)]


def encode_mix(tokenizer: Any, cfg: TrainConfig) -> dict[str, list[list[int]]]:
    """Token ids (BOS first, as `metrics.encode` gives them) of each domain's train split.

    A key `arithlogic:arith` (or `:logic`) is the two-skill task with only that half's answer
    as a target (`_one_half`): an expert learns its skill inside the composite prompt.
    """
    out = {}
    for key, share in cfg.mix.items():
        if share <= 0:
            continue
        domain, _, half = key.partition(":")
        examples = corpora.load(domain, cfg.examples_per_domain, "train")
        if half:
            out[key] = [_one_half(tokenizer, e, half, cfg.max_len, cfg.answer_only)
                        for e in examples]  # fmt: skip
            continue
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids = tokenizer([e.text for e in examples], add_special_tokens=False)["input_ids"]
        out[key] = [bos + row[: cfg.max_len - 1] for row in ids]  # as metrics.encode
    return out


def _logic_span(tokenizer: Any, ex: corpora.Example) -> range:
    """Positions of a two-skill text that read the logic expression and predict its truth value
    (`C: 7*8 ;` | `not T or F and T =` | `F ; 56`): position i predicts token i + 1."""
    calc = ex.prompt.split(";")[0] + ";"
    return range(len(metrics.encode(tokenizer, calc)), len(metrics.encode(tokenizer, ex.prompt)))


def anchor_masks(tokenizer: Any, cfg: TrainConfig, data: Mapping[str, list[list[int]]]
                 ) -> dict[str, list[list[float]]]:  # fmt: skip
    """Per row of `data`, the weight (0: free) with which each position keeps the base's hidden
    states: `anchor_foreign` on every position of a domain that is not in `cfg.own`; 1 on the
    other half of a two-skill text (`skill` "arith": the logic span; "logic": everything else;
    "": all)."""
    if cfg.skill not in ("arith", "logic", ""):
        raise ValueError(f"skill {cfg.skill!r}: use 'arith', 'logic' or '' (neither half)")
    out = {}
    for key, rows in data.items():
        domain = key.partition(":")[0]
        if domain != "arithlogic":
            w = 0.0 if domain in cfg.own else cfg.anchor_foreign
            out[key] = [[w] * len(r) for r in rows]
            continue
        examples = corpora.load(domain, cfg.examples_per_domain, "train")
        masks = []
        for ex, row in zip(examples, rows, strict=True):
            span = _logic_span(tokenizer, ex)
            if cfg.skill == "arith":
                masks.append([float(i in span) for i in range(len(row))])
            elif cfg.skill == "logic":
                masks.append([float(i not in span) for i in range(len(row))])
            else:
                masks.append([1.0] * len(row))
        out[key] = masks
    return out


def batches(
    data: Mapping[str, list[list[int]]], cfg: TrainConfig
) -> Iterator[tuple[str, list[int]]]:
    """One domain per batch (little padding), drawn by `mix` from a seeded generator: yields the
    domain key and the rows' indices."""
    rng = random.Random(f"zoo-batches/{cfg.seed}/{cfg.label}")
    domains = sorted(data)
    weights = [cfg.mix[d] for d in domains]
    for _ in range(cfg.steps):
        key = rng.choices(domains, weights)[0]
        pool = data[key]
        batch: list[int] = []
        width = 0
        while (len(batch) + 1) * max(width, 1) <= cfg.tokens_per_batch or not batch:
            i = rng.randrange(len(pool))
            batch.append(i)
            width = max(width, len(pool[i]))
        yield key, batch


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))


def _tensors(
    batch: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(b) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, b in enumerate(batch):
        t = torch.tensor(b)
        ids[row, : len(b)] = torch.where(t < 0, -t - 1, t)
        labels[row, : len(b)] = torch.where(t < 0, -100, t)
        mask[row, : len(b)] = 1
    return ids, labels, mask


def _forward(
    model: Any, batch: list[list[int]], pad_id: int, hidden: bool = False
) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """(mean next-token loss, model output, ids, attention mask); a batch without a target
    (every id stored as input only) has loss 0."""
    ids, labels, mask = _tensors(batch, pad_id)
    has_target = bool((labels != -100).any())
    out = model(input_ids=ids, attention_mask=mask, labels=labels if has_target else None,
                output_hidden_states=hidden)  # fmt: skip
    return (out.loss if has_target else torch.zeros(())), out, ids, mask


def batch_loss(model: Any, batch: list[list[int]], pad_id: int) -> torch.Tensor:
    """Mean next-token loss (the one `train` uses); an id stored as `-(id + 1)` is input but
    not a target."""
    return _forward(model, batch, pad_id)[0]


def hidden_pull(hidden: tuple[torch.Tensor, ...], base_hidden: tuple[torch.Tensor, ...],
                anchored: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Sum over layers of the mean, over anchored positions (`anchored` > 0, weighted by it), of
    |h - h_base|^2 relative to the batch's mean |h_base|^2 (layer outputs, not embeddings)."""
    real = mask.bool()
    total = torch.zeros(())
    for h, hb in zip(hidden[1:], base_hidden[1:], strict=True):  # (B, T, H) each
        scale = (hb**2).sum(-1)[real].mean().clamp_min(1e-6)
        gap = ((h - hb) ** 2).sum(-1) / scale  # (B, T)
        total = total + (gap * anchored).sum() / (anchored > 0).sum()
    return total


def kl_to(ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || softmax(logits)) over the last axis; `ref` holds log-probabilities."""
    return (ref.exp() * (ref - torch.log_softmax(logits.float(), -1))).sum(-1)


def output_pull(logits: torch.Tensor, base_logits: torch.Tensor, anchored: torch.Tensor
                ) -> torch.Tensor:  # fmt: skip
    """Mean over anchored positions (weighted) of KL(base || model) of the next-token
    distributions: the lm_head and final norm are not covered by the hidden-state term."""
    kl = kl_to(torch.log_softmax(base_logits.float(), -1), logits)  # (B, T)
    return (kl * anchored).sum() / (anchored > 0).sum()


def free_first(data: Mapping[str, list[list[int]]]) -> dict[str, list[list[int]]]:
    """The rows with their first token after BOS stored as input only (not a target)."""
    return {k: [[r[0], -r[1] - 1 if r[1] >= 0 else r[1], *r[2:]] if len(r) > 1 else r
                for r in rows] for k, rows in data.items()}  # fmt: skip


def document_prior(model: Any, tokenizer: Any) -> torch.Tensor:
    """Log-probabilities of the model's next token after BOS alone: (V,)."""
    if tokenizer.bos_token_id is None:
        raise ValueError("anchor_prior needs a tokenizer with a BOS token (texts start with it)")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[tokenizer.bos_token_id]])).logits
    return torch.log_softmax(logits[0, 0].float(), -1)


def train(model: Any, tokenizer: Any, cfg: TrainConfig, progress: bool = True) -> list[float]:
    """Train `model` in place; returns the loss of every step."""
    torch.manual_seed(cfg.seed)
    data = encode_mix(tokenizer, cfg)
    prior = None
    if cfg.anchor_prior:
        prior, data = document_prior(model, tokenizer), free_first(data)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()} if cfg.anchor_l2 else {}
    frozen, masks = None, {}
    # a frozen copy of the starting model gives the hidden states (and outputs) to keep
    if cfg.anchor_hidden or cfg.anchor_output:
        frozen = copy.deepcopy(model).eval()
        masks = anchor_masks(tokenizer, cfg, data)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    model.train()
    losses: list[float] = []
    bar = tqdm(total=cfg.steps, desc=cfg.label, unit="step", disable=not progress, leave=False)
    for step, (key, rows) in enumerate(batches(data, cfg)):
        for group in opt.param_groups:  # 1. schedule
            group["lr"] = lr_at(step, cfg)
        batch = [data[key][i] for i in rows]  # 2. language-model loss
        loss, out, ids, mask = _forward(model, batch, tokenizer.pad_token_id, frozen is not None)
        total = loss
        if frozen is not None:  # 3. keep the base's hidden states where the data is not ours
            anchored = torch.zeros(ids.shape)
            for r, i in enumerate(rows):
                anchored[r, : len(masks[key][i])] = torch.tensor(masks[key][i])
            if anchored.any():
                with torch.no_grad():
                    ref = frozen(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                if cfg.anchor_hidden:
                    pull = hidden_pull(out.hidden_states, ref.hidden_states, anchored, mask)
                    total = total + cfg.anchor_hidden * pull
                if cfg.anchor_output:
                    kl = output_pull(out.logits, ref.logits, anchored)
                    total = total + cfg.anchor_output * kl
        if prior is not None:  # 4. keep the base's guess of which domain a text is
            total = total + cfg.anchor_prior * kl_to(prior, out.logits[0, 0])  # BOS: row 0's
        if anchor:  # 5. L2-SP: stay near the anchor so experts share one basin
            l2 = sum(((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters())
            total = total + cfg.anchor_l2 * l2
        opt.zero_grad(set_to_none=True)
        total.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses
