"""How far a verifier on another CPU moves a peer's summaries, against the recompute tolerance.

A fusion round's verifier recomputes a batch of a peer's summaries and compares them within
`LOGP_ATOL` (0.02 nats) plus one float16 step (node/fusion/summary_verify.py). Other CPUs and
BLAS builds reorder float32 sums. There is one machine here, so this bench emulates the other
machines: one process writes the summaries as a peer does, then each verifier runs in its own
subprocess with other kernels and recomputes every batch:

- `same`: the peer's own settings (bit for bit: the fp16 storage is the only difference);
- `threads-2`: two torch threads (other reduction splits);
- `aten-default`: ATen's vector kernels without AVX2 (`ATEN_CPU_CAPABILITY=default`);
- `mkl-compat`: MKL's conditional-reproducibility GEMM kernels (`MKL_CBWR=COMPATIBLE`, plain
  SSE2: another blocking and no FMA). On this AMD EPYC `MKL_CBWR` = SSE4_2 / AVX / AVX2 and
  `MKL_ENABLE_INSTRUCTIONS` leave every GEMM bit-identical, so they are not variants;
- `one-by-one`: each sequence alone (other GEMM shapes, no padding);
- `all`: aten-default + mkl-compat + threads-2 + one-by-one at once;
- `float64`: the model in float64, close to the exact values; two float32 CPUs each sit near
  these, so twice this distance bounds how far they can be apart from each other.

For each, the largest difference of a stored top-k log-prob (ids in both) and of a token NLL
from the recomputation, the tolerance's margin over it, and the sequences the verifier refuses
(must be 0).

    .venv/bin/python bench/recompute_tolerance.py [--zoo DIR] [--model DIR ...] [--n 96] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

THREADS, ONE_BY_ONE, FLOAT64 = "UNODE_BENCH_THREADS", "UNODE_BENCH_ONE_BY_ONE", "UNODE_BENCH_F64"
ATEN, MKL = {"ATEN_CPU_CAPABILITY": "default"}, {"MKL_CBWR": "COMPATIBLE"}
VARIANTS: dict[str, dict[str, str]] = {  # environment of each verifier's process
    "same": {},
    "threads-2": {THREADS: "2"},
    "aten-default": ATEN,
    "mkl-compat": MKL,
    "one-by-one": {ONE_BY_ONE: "1"},
    "all": {**ATEN, **MKL, THREADS: "2", ONE_BY_ONE: "1"},
    "float64": {FLOAT64: "1"},
}
TOP_K = 10


def by_token(ids: Any, logp: Any, ref_ids: Any, ref: Any) -> list[float]:
    """|logp - ref| for each token of one row's top-k that the other row holds too."""
    where = {int(t): float(v) for t, v in zip(ref_ids.tolist(), ref.tolist(), strict=True)}
    return [abs(float(v) - where[int(t)]) for t, v in zip(ids.tolist(), logp.tolist(), strict=True)
            if int(t) in where]  # fmt: skip


def worker(summaries: Path, model_dir: Path, corpus: Path, rows_out: Path) -> dict[str, Any]:
    """Recompute every batch of `summaries` under this process's kernels and compare with what
    was stored; the float32 recomputation goes to `rows_out` (npz) for `kernel_delta`."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from node.fusion.corpus import load_corpus
    from node.fusion.summaries import SummarySettings, _forward_batch, batches_of
    from node.fusion.summary_store import SummaryReader
    from node.fusion.summary_verify import compare_sequence
    from node.fusion.tokens import encode

    torch.set_num_threads(int(os.environ.get(THREADS, "1")))
    one_by_one = os.environ.get(ONE_BY_ONE) == "1"
    dtype = torch.float64 if os.environ.get(FLOAT64) == "1" else torch.float32
    got = SummaryReader(summaries)
    s = SummarySettings(top_k=TOP_K + 1, max_len=int(got.manifest["settings"]["max_len"]))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    texts = load_corpus(corpus)
    worst_nll = 0.0
    deltas: list[float] = []
    refused: list[str] = []
    kept: list[dict[str, np.ndarray]] = []  # in sequence order (batches come in order)
    t0 = time.perf_counter()
    batches = batches_of(len(texts), s)  # batching depends on batch and shard size only
    groups = [range(i, i + 1) for b in batches for i in b] if one_by_one else batches
    for batch in groups:
        encs = [encode(tok, texts[i].text, s.max_len) for i in batch]
        for i, enc, rows in zip(batch, encs, _forward_batch(model, encs, s, pad_id), strict=True):
            seq = got.sequence(i)
            kept.append(rows)
            problem = compare_sequence(seq, enc, rows)
            if problem:
                refused.append(f"sequence {i}: {problem}")
            for r in range(len(rows["topk_ids"])):
                deltas += by_token(seq.topk_ids[r], seq.topk_logp[r],
                                   rows["topk_ids"][r], rows["topk_logp"][r])  # fmt: skip
            nll = np.abs(seq.token_nll.astype(np.float64) - rows["token_nll"].astype(np.float64))
            worst_nll = max(worst_nll, float(nll.max(initial=0.0)))
    np.savez(rows_out, **{k: np.concatenate([r[k] for r in kept]) for k in kept[0]})
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "compared": len(deltas),
        "max_logp_delta": max(deltas, default=0.0),
        "p999_logp_delta": float(np.quantile(deltas, 0.999)) if deltas else 0.0,
        "max_nll_delta": worst_nll,
        "refused": len(refused),
        "first_refusal": refused[0] if refused else "",
        "sequences": len(texts),
    }


def kernel_delta(a: Path, b: Path) -> dict[str, float]:
    """Largest differences between two float32 recomputations (no float16 storage between):
    top-k log-probs of the ids both rows hold, token NLLs, and the share of rows whose top-k
    order differs (near-ties)."""
    import numpy as np

    with np.load(a, allow_pickle=False) as x, np.load(b, allow_pickle=False) as y:
        ids_a, ids_b = x["topk_ids"][:, :TOP_K], y["topk_ids"][:, :TOP_K]
        lp_a, lp_b = x["topk_logp"][:, :TOP_K], y["topk_logp"][:, :TOP_K]
        same = (ids_a == ids_b).all(axis=1)
        worst = float(np.abs(lp_a[same] - lp_b[same]).max(initial=0.0))
        for r in np.flatnonzero(~same):  # reordered rows: match by token
            worst = max(worst, *by_token(ids_a[r], lp_a[r], ids_b[r], lp_b[r]))
        nll = float(np.abs(x["token_nll"] - y["token_nll"]).max(initial=0.0))
        return {"kernel_logp": worst, "kernel_nll": nll, "reordered": float((~same).mean())}


def run_variant(
    name: str, summaries: Path, model: Path, corpus: Path, rows_out: Path
) -> dict[str, Any]:
    clear = {THREADS, ONE_BY_ONE, FLOAT64, *ATEN, *MKL}
    env = {k: v for k, v in os.environ.items() if k not in clear} | VARIANTS[name]
    cmd = [sys.executable, __file__, "--worker", str(summaries), str(model), str(corpus)]
    cmd.append(str(rows_out))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"variant {name} failed:\n{res.stderr[-2000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def models_of(args: argparse.Namespace) -> list[Path]:
    from node.errors import UserError
    from node.zoo.build import default_dir, load_manifest

    if args.model:
        for m in args.model:
            if not (Path(m) / "config.json").is_file():
                raise UserError("--model", m, "give a model directory with config.json")
        return [Path(m) for m in args.model]
    zoo = Path(args.zoo) if args.zoo else default_dir()
    manifest = load_manifest(zoo)
    if manifest is None:
        raise UserError("--zoo", str(zoo), "run `unode zoo build` or pass --model DIR",
                        "holds no built zoo")  # fmt: skip
    root = Path(manifest["root"])
    return [root / "base", root / "gpt2-unigram"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", help="a built zoo (default: $UNODE_HOME/zoo); its base and GPT-2")
    ap.add_argument("--model", action="append", help="a model directory instead of the zoo's")
    ap.add_argument("--n", type=int, default=96, help="sequences in the corpus (default 96)")
    ap.add_argument("--max-chars", type=int, default=400, help="longest corpus text")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated subset of: {', '.join(VARIANTS)}")  # fmt: skip
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*map(Path, args.worker))))
        return
    from node.errors import UserError
    from node.fusion.corpus import write_toy_corpus
    from node.fusion.summaries import SummarySettings, summarize
    from node.fusion.summary_verify import LOGP_ATOL

    try:
        if args.n < 1:
            raise UserError("--n", str(args.n), "give at least 1 sequence")
        names = [v for v in args.variants.split(",") if v]
        bad = [v for v in names if v not in VARIANTS]
        if bad:
            raise UserError("--variants", bad[0], f"choose from {', '.join(VARIANTS)}")
        models = models_of(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_toy_corpus(Path(tmp) / "corpus.jsonl", n=args.n, max_chars=args.max_chars)
        for model in models:
            out = Path(tmp) / f"summ-{model.name}"
            t0 = time.perf_counter()
            summarize(model, corpus, out, SummarySettings(top_k=TOP_K), progress=False)
            print(f"{model.name}: {args.n} sequences summarized as a peer does in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
            print(f"  {'verifier':<13} | vs stored: {'max Δ logp':>10} {'max Δ NLL':>10} "
                  f"{'refused':>8} | vs same: {'max Δ logp':>10} {'max Δ NLL':>10} "
                  f"{'reordered':>9} {'ATOL / Δ':>9}")  # fmt: skip
            rows = {v: Path(tmp) / f"rows-{model.name}-{v}.npz" for v in ["same", *names]}
            for name in dict.fromkeys(["same", *names]):
                r = run_variant(name, out, model, corpus, rows[name])
                r |= kernel_delta(rows["same"], rows[name])
                r["kernel_margin"] = LOGP_ATOL / max(r["kernel_logp"], r["kernel_nll"], 1e-12)
                results[f"{model.name}/{name}"] = r
                margin = "exact" if r["kernel_logp"] == r["kernel_nll"] == 0 else (
                    f"{r['kernel_margin']:.0f}x")  # fmt: skip
                print(f"  {name:<13} | {'':>10} {r['max_logp_delta']:>10.2e} "
                      f"{r['max_nll_delta']:>10.2e} {r['refused']:>4}/{r['sequences']:<3} | "
                      f"{'':>8} {r['kernel_logp']:>10.2e} {r['kernel_nll']:>10.2e} "
                      f"{r['reordered']:>9.2%} {margin:>9}", flush=True)  # fmt: skip
                if r["refused"]:
                    print(f"    first refusal: {r['first_refusal']}")
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
