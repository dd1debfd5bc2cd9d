"""The zoo's training loop: deterministic mixed-domain batches, AdamW with warm-up and cosine
decay, and an optional L2-SP pull toward an anchor model (gentle fine-tuning that merges well).
"""

from __future__ import annotations

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
    tokens_per_batch: int = 1024  # short tasks get many examples per batch, prose few
    max_len: int = 192
    seed: int = 0
    examples_per_domain: int = 6000
    label: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)


def _one_half(tokenizer: Any, ex: corpora.Example, half: str, max_len: int) -> list[int]:
    """Ids of a two-skill text in which only `half`'s answer (`arith` or `logic`) is a training
    target: the other half's answer tokens are stored as `-(id + 1)` (input, not target).
    """
    full = metrics.encode(tokenizer, ex.text, max_len)
    _, truth = corpora.two_skill_parts(ex.answer)
    if half == "arith":  # the truth value is not a target
        lo = len(metrics.encode(tokenizer, ex.prompt + " "))
        hi = len(metrics.encode(tokenizer, f"{ex.prompt} {truth}"))
    else:  # the number (and what follows) is not a target
        lo, hi = len(metrics.encode(tokenizer, f"{ex.prompt} {truth} ; ")), len(full)
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
            out[key] = [_one_half(tokenizer, e, half, cfg.max_len) for e in examples]
            continue
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids = tokenizer([e.text for e in examples], add_special_tokens=False)["input_ids"]
        out[key] = [bos + row[: cfg.max_len - 1] for row in ids]  # as metrics.encode
    return out


def batches(data: Mapping[str, list[list[int]]], cfg: TrainConfig) -> Iterator[list[list[int]]]:
    """One domain per batch (little padding), drawn by `mix` from a seeded generator."""
    rng = random.Random(f"zoo-batches/{cfg.seed}/{cfg.label}")
    domains = sorted(data)
    weights = [cfg.mix[d] for d in domains]
    for _ in range(cfg.steps):
        pool = data[rng.choices(domains, weights)[0]]
        batch: list[list[int]] = []
        width = 0
        while (len(batch) + 1) * max(width, 1) <= cfg.tokens_per_batch or not batch:
            ids = pool[rng.randrange(len(pool))]
            batch.append(ids)
            width = max(width, len(ids))
        yield batch


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))


def batch_loss(model: Any, batch: list[list[int]], pad_id: int) -> torch.Tensor:
    """Mean next-token loss; an id stored as `-(id + 1)` is input but not a target."""
    width = max(len(b) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, b in enumerate(batch):
        t = torch.tensor(b)
        ids[row, : len(b)] = torch.where(t < 0, -t - 1, t)
        labels[row, : len(b)] = torch.where(t < 0, -100, t)
        mask[row, : len(b)] = 1
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss  # type: ignore[no-any-return]


def train(model: Any, tokenizer: Any, cfg: TrainConfig, progress: bool = True) -> list[float]:
    """Train `model` in place; returns the loss of every step."""
    torch.manual_seed(cfg.seed)
    data = encode_mix(tokenizer, cfg)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()} if cfg.anchor_l2 else {}
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
    for step, batch in enumerate(batches(data, cfg)):
        for group in opt.param_groups:  # 1. schedule
            group["lr"] = lr_at(step, cfg)
        loss = batch_loss(model, batch, tokenizer.pad_token_id)  # 2. language-model loss
        total = loss
        if anchor:  # 3. L2-SP: stay near the anchor so experts share one basin
            pull = sum(((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters())
            total = loss + cfg.anchor_l2 * pull
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
