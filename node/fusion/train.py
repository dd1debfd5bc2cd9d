"""`unode fuse`: continual training of a target on λ·CLM + (1−λ)·fusion, with checkpoints,
resume, a logged loss curve, and an output model directory with its lineage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from node.errors import UserError
from node.fusion.checkpoint import load_checkpoint, save_checkpoint
from node.fusion.corpus import corpus_sha256
from node.fusion.dataset import FusionExample, SourceReport, build_dataset, collate
from node.fusion.fuse_fns import FUSION_FNS
from node.fusion.loss import clm_and_fusion, combined_loss
from node.fusion.summary_store import model_sha256, write_json_atomic


@dataclass
class FuseConfig:
    """One fusion run. Defaults follow FuseLLM (λ = 0.9, lr 1e-5, MinCE) scaled to small runs."""

    target: Path
    summaries: list[Path]
    corpus: Path
    out: Path
    fusion: str = "min_ce"
    lam: float = 0.9  # weight of the plain CLM term
    epochs: int = 1
    lr: float = 1e-5
    batch_size: int = 4
    grad_accum: int = 1
    warmup: int = 10  # optimizer steps of linear warm-up before the cosine decay
    max_steps: int | None = None  # overrides epochs
    stop_after: int | None = None  # leave a checkpoint and return after this many steps
    response_only: bool = False
    resume: bool = False
    bf16: bool = False  # bf16 autocast (CPU or GPU)
    max_len: int = 2048
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    save_every: int = 50
    vocab_map: str = "mined"  # exact | mined | stats
    alignment: str = "auto"  # auto (offsets where available, else DP) | dp
    eval_seqs: int = 64  # sequences scored before and after training (0: none)
    cache_dir: Path | None = None
    progress: bool = True
    extra_lineage: dict[str, Any] = field(default_factory=dict)


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".work")


def validate(cfg: FuseConfig) -> None:
    """Every user-input check, before anything is written."""
    if cfg.fusion not in FUSION_FNS:
        raise UserError("--fusion", cfg.fusion, f"use one of {', '.join(FUSION_FNS)}")
    if not 0.0 <= cfg.lam <= 1.0:
        raise UserError("--lam", cfg.lam, "use a value between 0 and 1")
    if cfg.vocab_map not in ("exact", "mined", "stats"):
        raise UserError("--vocab-map", cfg.vocab_map, "use exact, mined or stats")
    if cfg.alignment not in ("auto", "dp"):
        raise UserError("--alignment", cfg.alignment, "use auto or dp")
    for name, value in (("--epochs", cfg.epochs), ("--batch-size", cfg.batch_size)):
        if value < 1:
            raise UserError(name, value, "use a value of at least 1")
    if cfg.grad_accum < 1 or (cfg.max_steps is not None and cfg.max_steps < 1):
        raise UserError("--grad-accum/--max-steps", cfg.grad_accum, "use values of at least 1")
    if not (Path(cfg.target) / "config.json").is_file():
        raise UserError("--target", str(cfg.target), "give a model directory with config.json")
    if not cfg.summaries:
        raise UserError("--summaries", "[]", "give at least one summaries directory")
    if Path(cfg.out).exists():
        raise UserError("--out", str(cfg.out), "give a new directory", "already exists")
    work = work_dir(Path(cfg.out))
    if work.exists() and not cfg.resume:
        raise UserError("--out", str(work), "pass --resume to continue, or delete it", "left over")


def lr_at(step: int, total: int, cfg: FuseConfig) -> float:
    """Linear warm-up, then cosine decay to 0 at `total`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def batch_indices(micro: int, n: int, cfg: FuseConfig) -> np.ndarray:
    """The examples of global micro-batch `micro`: a seeded permutation per epoch."""
    per_epoch = math.ceil(n / cfg.batch_size)
    epoch, within = divmod(micro, per_epoch)
    perm = np.random.default_rng(cfg.seed + epoch).permutation(n)
    return perm[within * cfg.batch_size : (within + 1) * cfg.batch_size]


def forward(
    model: Any, batch: dict[str, torch.Tensor], fusion: str, bf16: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's logits (B, T, V) and the fused sparse target: ids, probs (B, T-1, K)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ids, probs = FUSION_FNS[fusion](batch["ids"], batch["probs"], batch["seq_ce"], batch["tok_ce"])
    return logits, ids, probs


def losses(
    model: Any, batch: dict[str, torch.Tensor], fusion: str, bf16: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLM, fusion) for one padded batch."""
    logits, ids, probs = forward(model, batch, fusion, bf16)
    return clm_and_fusion(logits[:, :-1], batch["labels"], ids, probs, batch["mask"])


@torch.inference_mode()
def evaluate(
    model: Any, data: list[FusionExample], cfg: FuseConfig, pad_id: int
) -> dict[str, float] | None:
    """Mean CLM and fusion losses over the first `cfg.eval_seqs` training sequences."""
    if cfg.eval_seqs <= 0:
        return None
    was_training = model.training
    model.eval()
    tot = {"clm": 0.0, "fusion": 0.0, "positions": 0.0}
    data = data[: cfg.eval_seqs]
    for start in range(0, len(data), cfg.batch_size):
        batch = collate(data[start : start + cfg.batch_size], pad_id)
        clm, fus = losses(model, batch, cfg.fusion, cfg.bf16)
        n = float(batch["mask"].sum())
        tot["clm"] += float(clm) * n
        tot["fusion"] += float(fus) * n
        tot["positions"] += n
    model.train(was_training)
    p = max(tot["positions"], 1.0)
    return {"clm": tot["clm"] / p, "fusion": tot["fusion"] / p}


def _train_step(
    model: Any,
    opt: Any,
    data: list[FusionExample],
    step: int,
    cfg: FuseConfig,
    pad_id: int,
    total: int,
) -> dict[str, float]:
    lr = lr_at(step, total, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    sums = {"clm": 0.0, "fusion": 0.0, "loss": 0.0, "tokens": 0.0}
    for micro in range(cfg.grad_accum):
        batch = collate(
            [data[i] for i in batch_indices(step * cfg.grad_accum + micro, len(data), cfg)], pad_id
        )
        logits, ids, probs = forward(model, batch, cfg.fusion, cfg.bf16)
        labels, mask = batch["labels"], batch["mask"]
        loss, clm, fus = combined_loss(logits, labels, ids, probs, mask, cfg.lam)
        (loss / cfg.grad_accum).backward()  # type: ignore[no-untyped-call]
        for key, value in (("clm", clm), ("fusion", fus), ("loss", float(loss.detach()))):
            sums[key] += value / cfg.grad_accum
        sums["tokens"] += float(batch["attention_mask"].sum())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"step": step + 1, "lr": lr, "grad_norm": float(grad_norm), **sums}


def fuse(cfg: FuseConfig) -> Path | None:
    """Run (or resume) a fusion; returns the output directory, or None if stopped early."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    validate(cfg)
    work = work_dir(Path(cfg.out))
    tok = AutoTokenizer.from_pretrained(cfg.target)
    model = AutoModelForCausalLM.from_pretrained(cfg.target, dtype=torch.float32)
    max_len = min(cfg.max_len, _max_positions(model.config))
    data, reports = build_dataset(
        tok,
        cfg.corpus,
        list(cfg.summaries),
        max_len,
        cfg.response_only,
        cfg.vocab_map,
        cfg.cache_dir,
        cfg.progress,
        cfg.alignment,
    )
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    total = cfg.max_steps or cfg.epochs * math.ceil(
        math.ceil(len(data) / cfg.batch_size) / cfg.grad_accum
    )
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = work / "checkpoint"
    if cfg.resume and ckpt.exists():
        state = load_checkpoint(ckpt, model, opt)
        _truncate_log(work / "train_log.jsonl", state["step"])
    else:
        work.mkdir(parents=True, exist_ok=True)
        (work / "train_log.jsonl").unlink(missing_ok=True)  # from a run that never checkpointed
        state = {"step": 0, "eval_before": evaluate(model, data, cfg, pad_id)}
    _run_steps(model, opt, data, cfg, pad_id, total, state, work)
    if state["step"] < total:
        return None
    state["eval_after"] = evaluate(model, data, cfg, pad_id)
    return _write_output(cfg, model, tok, reports, state, work)


def _run_steps(
    model: Any,
    opt: Any,
    data: list[FusionExample],
    cfg: FuseConfig,
    pad_id: int,
    total: int,
    state: dict[str, Any],
    work: Path,
) -> None:
    """Optimizer steps until `total` (or `stop_after` more), logging each, checkpointing."""
    from tqdm import tqdm

    model.train()
    t0, stop = time.perf_counter(), min(total, state["step"] + (cfg.stop_after or total))
    bar = tqdm(
        total=total, initial=state["step"], desc="fuse", unit="step", disable=not cfg.progress
    )
    while state["step"] < stop:
        row = _train_step(model, opt, data, state["step"], cfg, pad_id, total)
        state["step"] = row["step"]
        row["elapsed_s"] = time.perf_counter() - t0
        with open(work / "train_log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", fusion=f"{row['fusion']:.3f}")
        if state["step"] % cfg.save_every == 0 or state["step"] == stop:
            save_checkpoint(work / "checkpoint", model, opt, state)
    bar.close()


def _max_positions(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(config, name, None), int):
            return int(getattr(config, name))
    return 1 << 30


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint (they are redone on resume)."""
    if path.exists():
        lines = [
            ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step
        ]
        path.write_text("".join(ln + "\n" for ln in lines))


def _write_output(
    cfg: FuseConfig,
    model: Any,
    tok: Any,
    reports: list[SourceReport],
    state: dict[str, Any],
    work: Path,
) -> Path:
    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.copy(work / "train_log.jsonl", tmp / "train_log.jsonl")
    settings = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("summaries", "extra_lineage", "progress", "cache_dir")
    }
    lineage = {
        "kind": "fusion",
        "method": "fusellm",
        "target": {"path": str(cfg.target), "model_sha256": model_sha256(Path(cfg.target))},
        "sources": [dataclasses.asdict(r) for r in reports],
        "corpus_sha256": corpus_sha256(cfg.corpus),
        "settings": settings,
        "steps": state["step"],
        "eval_before": state.get("eval_before"),
        "eval_after": state.get("eval_after"),
        **cfg.extra_lineage,
    }
    write_json_atomic(tmp / "lineage.json", lineage)
    tmp.replace(out)
    shutil.rmtree(work)
    return out
