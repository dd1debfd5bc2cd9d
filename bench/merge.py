"""Speed and peak memory of `unode merge` against mergekit 0.1.5, side by side.

Builds a ~170M-parameter bf16 Llama-shaped model (hidden 1024, 8 layers, vocab 32000) and two
fine-tune-like variants in bench/_work (cached), then merges them with both tools on the same
recipes, alternating which goes first, each run in a fresh subprocess (peak RSS per run: the
child's VmHWM). Prints medians and unode/mergekit ratios of wall time, merge-only time and peak RSS.

    .venv/bin/python bench/merge.py [--reps 3] [--methods linear,ties] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

WORK = Path(__file__).resolve().parent / "_work"
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della", "slerp")
HIDDEN, LAYERS, VOCAB, INTER, HEADS = 1024, 8, 32000, 2816, 16


def llama_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{p}mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{p}mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[f"{p}input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def _config() -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "vocab_size": VOCAB, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
        "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip


def _save_sharded(out: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Two shards plus an index, as a real checkpoint has."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps(_config(), indent=2))


def build_models(work: Path) -> list[Path]:
    dirs = [work / "base", work / "ft0", work / "ft1"]
    if all((d / "config.json").is_file() for d in dirs):
        return dirs
    gen = torch.Generator().manual_seed(0)
    base = {
        n: (torch.randn(s, generator=gen) * (0.02 if len(s) == 2 else 1.0)).to(torch.bfloat16)
        for n, s in llama_shapes().items()
    }
    _save_sharded(dirs[0], base)
    for k, d in enumerate(dirs[1:]):
        g = torch.Generator().manual_seed(100 + k)
        out = {}
        for n, t in base.items():
            w = t.float()
            if w.ndim == 2:  # low-rank plus sparse, as fine-tuning deltas look
                u, v = (
                    torch.randn(w.shape[0], 4, generator=g),
                    torch.randn(4, w.shape[1], generator=g),
                )
                sparse = torch.randn(w.shape, generator=g) * (
                    torch.rand(w.shape, generator=g) < 0.01
                )
                w = w + 0.02 * 0.02 * ((u @ v) / 2 + 5 * sparse)
            else:
                w = w + 0.02 * torch.randn(w.shape, generator=g)
            out[n] = w.to(torch.bfloat16)
        _save_sharded(d, out)
    return dirs


def recipe(method: str, dirs: list[Path], dtype: str) -> dict[str, object]:
    base, a, b = (str(d) for d in dirs)
    common = {"dtype": dtype, "out_dtype": "bfloat16"}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                "parameters": {"t": 0.5}, **common}  # fmt: skip
    if method == "linear":
        return {"merge_method": "linear", "models": [
            {"model": m, "parameters": {"weight": 1.0}} for m in (base, a, b)], **common}  # fmt: skip
    extra = {"density": 0.5}
    if method == "breadcrumbs":
        extra = {"density": 0.9, "gamma": 0.01}
    if method == "task_arithmetic":
        extra = {}
    models = [{"model": m, "parameters": {"weight": 0.5, **extra}} for m in (a, b)]
    return {"merge_method": method, "base_model": base, "models": models, **common}


def child(tool: str, recipe_path: str, out: str) -> None:
    """Runs inside the measured subprocess: import the tool, time only the merge call."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as `unode merge` does
    t0 = time.perf_counter()
    if tool == "unode":
        from node.merge.api import merge

        t1 = time.perf_counter()
        merge(Path(recipe_path), Path(out), force=True, progress=False)
    else:
        import yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        t1 = time.perf_counter()
        cfg = MergeConfiguration.model_validate(yaml.safe_load(Path(recipe_path).read_text()))
        opts = MergeOptions(lazy_unpickle=False, random_seed=0, quiet=True, copy_tokenizer=False)
        run_merge(cfg, out, opts)
    t2 = time.perf_counter()
    print(json.dumps({"import": t1 - t0, "merge": t2 - t1, "hwm_kb": _vm_hwm_kb()}))


def _vm_hwm_kb() -> int:
    """Peak resident set of this process image (wait4's ru_maxrss inherits the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _child_env() -> dict[str, str]:
    """The measured child's environment: this checkout importable; OpenMP threads that sleep
    instead of spinning while they wait (on a shared machine spinning slows both tools)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def run(tool: str, recipe_path: Path, out: Path) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", tool, str(recipe_path), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=_child_env(),
    )
    assert proc.stdout is not None
    text = proc.stdout.read()
    status = proc.wait()
    wall = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"{tool} failed on {recipe_path.name} (status {status})")
    inner = json.loads(text.decode().strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return {"wall": wall, "merge": inner["merge"], "rss_mb": inner["hwm_kb"] / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--dtype", default="float32", help="recipe `dtype` (compute dtype)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    import yaml

    dirs = build_models(WORK)
    print(
        f"models: {sum(t for t in (torch.Size(s).numel() for s in llama_shapes().values())) / 1e6:.0f}M params, bf16, in {WORK}"
    )
    rows = []
    for method in args.methods.split(","):
        path = WORK / f"recipe-{method}.yml"
        path.write_text(yaml.safe_dump(recipe(method, dirs, args.dtype), sort_keys=False))
        res: dict[str, list[dict[str, float]]] = {"unode": [], "mergekit": []}
        for rep in range(args.reps):
            for tool in ("unode", "mergekit") if rep % 2 == 0 else ("mergekit", "unode"):
                res[tool].append(run(tool, path, WORK / f"out-{tool}"))
                print(f"  {method} rep {rep} {tool}: {json.dumps(res[tool][-1])}", flush=True)
        print(f"{method}: load average {os.getloadavg()[0]:.1f} after", flush=True)
        rows.append(
            (
                method,
                {t: {k: statistics.median(r[k] for r in v) for k in v[0]} for t, v in res.items()},
            )
        )
        _print_row(*rows[-1])
    print("\nmedians over", args.reps, "runs; ratio = unode / mergekit (lower is better)")
    print(f"load average at the end (1/5/15 min): {os.getloadavg()}")
    print(
        f"{'method':<16}{'wall u/m (s)':>16}{'ratio':>7}{'merge u/m (s)':>17}{'ratio':>7}{'RSS u/m (MB)':>16}{'ratio':>7}"
    )
    for method, med in rows:
        _print_row(method, med)


def _print_row(method: str, med: dict[str, dict[str, float]]) -> None:
    u, m = med["unode"], med["mergekit"]
    print(
        f"{method:<16}{u['wall']:>7.1f}/{m['wall']:<7.1f}{u['wall'] / m['wall']:>8.2f}"
        f"{u['merge']:>8.1f}/{m['merge']:<7.1f}{u['merge'] / m['merge']:>8.2f}"
        f"{u['rss_mb']:>7.0f}/{m['rss_mb']:<7.0f}{u['rss_mb'] / m['rss_mb']:>8.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
