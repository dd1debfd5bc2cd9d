"""Fusion storage, speed and memory, each compared side by side with its reference:

1. bytes per real token of unode summaries against FuseLLM's layout (top-10 fp16 logits and
   int64 ids for every position of a sequence padded to 2048);
2. fusion training steps (λ·CLM + (1−λ)·sparse fusion, two sources, k = 10) against plain
   CLM steps of the same model on the same batches (tokens/s, alternating);
3. peak memory of the sparse fusion loss against a dense (B, T, V) target (each in a fresh
   subprocess; peak RSS from /proc/self/status VmHWM).

    .venv/bin/python bench/summaries.py [--vocab 8000] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from node import toymodels
from node.fusion.corpus import load_corpus, write_toy_corpus
from node.fusion.dataset import build_dataset, collate
from node.fusion.loss import combined_loss
from node.fusion.summaries import SummarySettings, summarize
from node.fusion.tokens import encode
from node.fusion.train import forward

FUSELLM_BYTES_PER_POSITION = 10 * 2 + 10 * 8  # top-10 fp16 logits + int64 ids
FUSELLM_PADDED_LEN = 2048


def storage(root: Path, model: Path, corpus: Path, tok: Any) -> Path:
    out = root / "summ"
    t0 = time.perf_counter()
    summarize(model, corpus, out, SummarySettings(top_k=10, max_len=2048), progress=False)
    dt = time.perf_counter() - t0
    n_tok = sum(len(encode(tok, ex.text, 2048).ids) for ex in load_corpus(corpus))
    n_seq = len(load_corpus(corpus))
    ours = sum(p.stat().st_size for p in out.glob("shard-*.safetensors"))
    unpadded = n_tok * FUSELLM_BYTES_PER_POSITION
    padded = n_seq * FUSELLM_PADDED_LEN * FUSELLM_BYTES_PER_POSITION
    print(
        f"summaries: {n_seq} sequences, {n_tok} tokens, {dt:.1f}s; unode {ours / n_tok:.1f} B/token; "
        f"FuseLLM layout {FUSELLM_BYTES_PER_POSITION} B/position unpadded "
        f"(unode/FuseLLM {ours / unpadded:.0%}), padded to 2048: {padded / n_tok:.0f} B/token "
        f"(unode/FuseLLM {ours / padded:.1%})"
    )
    return out


def training_speed(
    model_dir: Path, tok: Any, corpus: Path, summaries: list[Path], steps: int
) -> None:
    from transformers import AutoModelForCausalLM

    data, _ = build_dataset(tok, corpus, summaries, 256, progress=False)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    pad = tok.pad_token_id
    batches = [data[i : i + 4] for i in range(0, 4 * steps, 4)]
    times: dict[str, list[float]] = {"fusion": [], "clm": []}
    tokens = 0
    for rnd in range(4):
        for mode in ("fusion", "clm") if rnd % 2 == 0 else ("clm", "fusion"):
            t0 = time.perf_counter()
            for chunk in batches:
                batch = collate(chunk, pad)
                if mode == "fusion":
                    logits, ids, probs = forward(model, batch, "min_ce", False)
                    loss = combined_loss(logits, batch["labels"], ids, probs, batch["mask"], 0.9)[0]
                else:
                    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
                    loss = model(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        labels=labels,
                    ).loss
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                opt.zero_grad()
                tokens += int(batch["attention_mask"].sum()) if rnd == 0 and mode == "clm" else 0
            times[mode].append(time.perf_counter() - t0)
    f, c = min(times["fusion"]), min(times["clm"])
    print(
        f"training: {steps} steps of 4 sequences ({tokens} tokens): fusion {tokens / f:.0f} tok/s, "
        f"CLM only {tokens / c:.0f} tok/s, fusion/CLM throughput {c / f:.2f}x"
    )


def child_memory(kind: str, b: int, t: int, v: int, k: int) -> None:
    """Run one loss + backward and print the peak RSS (run in a fresh process)."""
    from node.fusion.loss import combined_loss, dense_fusion_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(b, t, v, generator=gen, requires_grad=True)
    ids = torch.randint(0, v, (b, t - 1, k), generator=gen)
    probs = torch.softmax(torch.randn(b, t - 1, k, generator=gen), -1)
    labels = ids[..., 0].clone()
    mask = torch.ones(b, t - 1, dtype=torch.bool)
    base = _peak_kb()
    if kind == "sparse":  # the training path
        loss = combined_loss(logits, labels, ids, probs, mask, 0.9)[0]
    else:  # the same loss with a dense (B, T, V) target, as FuseLLM builds it
        clm = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels)
        loss = 0.9 * clm + 0.1 * dense_fusion_loss(logits[:, :-1], ids, probs, mask)
    loss.backward()  # type: ignore[no-untyped-call]
    print(json.dumps({"peak_kb": _peak_kb(), "before_kb": base, "loss": float(loss.detach())}))


def _peak_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def memory(b: int, t: int, v: int, k: int) -> None:
    res = {}
    for kind in ("sparse", "dense"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--shape", f"{b},{t},{v},{k}"],
            capture_output=True,
            text=True,
            check=True,
        )
        res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    s, d = res["sparse"], res["dense"]
    assert abs(s["loss"] - d["loss"]) < 1e-3 * max(1.0, abs(d["loss"]))
    logits_mb = b * t * v * 4 / 2**20
    ds, dd = s["peak_kb"] - s["before_kb"], d["peak_kb"] - d["before_kb"]
    print(
        f"loss memory (B={b}, T={t}, V={v}, k={k}; logits {logits_mb:.0f} MiB): peak RSS sparse "
        f"{s['peak_kb'] / 1024:.0f} MiB, dense {d['peak_kb'] / 1024:.0f} MiB, "
        f"sparse/dense {s['peak_kb'] / d['peak_kb']:.2f}; above the logits: sparse "
        f"{ds / 1024:.0f} MiB, dense {dd / 1024:.0f} MiB ({ds / dd:.2f}); same loss value"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--n", type=int, default=120, help="corpus examples")
    ap.add_argument("--child")
    ap.add_argument("--shape", default="4,512,32000,10")
    args = ap.parse_args()
    torch.set_num_threads(1)
    b, t, v, k = (int(x) for x in args.shape.split(","))
    if args.child:
        child_memory(args.child, b, t, v, k)
        return
    root = Path(tempfile.mkdtemp(prefix="unode-bench-"))
    bpe, uni = (
        toymodels.train_tokenizer(args.vocab, "bpe"),
        toymodels.train_tokenizer(args.vocab, "unigram"),
    )
    target = toymodels.build_model(root / "tgt", "llama", bpe, hidden=256, layers=4)
    source = toymodels.build_model(root / "src", "gpt2", uni, hidden=192, layers=3)
    corpus = write_toy_corpus(root / "c.jsonl", n=args.n)
    s_tgt = storage(root, target, corpus, bpe)
    s_src = root / "summ_src"
    summarize(source, corpus, s_src, SummarySettings(top_k=10, max_len=256), progress=False)
    training_speed(target, bpe, corpus, [s_src, s_tgt], args.steps)
    memory(b, t, v, k)
    print("(measured on 1 thread, under load from other work on the machine)")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
