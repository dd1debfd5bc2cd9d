"""Parity of `unode merge` with mergekit 0.1.5 for every method, on the same tiny inputs.

Builds a tiny Llama-shaped base and three fine-tune-like variants (fp32), merges each recipe
with both tools in this process and prints, per method, the largest absolute difference over
all tensors, how many elements differ by more than 1e-5, and for the random methods (DARE,
DELLA) the kept fraction and the delta-norm ratio instead.

Elements tied at a sparsification cut (equal magnitudes straddling a TIES, breadcrumbs or SCE
threshold) are chosen as mergekit chooses them (`mergekit_tie_order`) unless --own-ties,
which takes them in flat-index order (unode's default, the order a stable sort gives). The
last column counts the elements over 1e-5 under the other order, to show the difference.

    .venv/bin/python bench/parity.py [--methods ties,slerp] [--own-ties]
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from node import toymodels
from node.merge.api import merge
from node.merge.methods import mergekit_tie_order

RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def m(path: Path, **params: Any) -> dict[str, Any]:
    return {"model": str(path), "parameters": params} if params else {"model": str(path)}


def recipes(b: Path, v: list[Path]) -> dict[str, dict[str, Any]]:
    ta: dict[str, Any] = {"base_model": str(b), "dtype": "float32"}
    grad, filt = [0.3, 0.9], [{"filter": "mlp", "value": 0.7}, {"value": 0.4}]
    two = [m(v[0], weight=grad, density=0.5), m(v[1], weight=filt, density=0.7)]
    out: dict[str, dict[str, Any]] = {
        "linear": {"models": [m(b, weight=0.2), m(v[0], weight=grad), m(v[1], weight=filt)], "dtype": "float32"},
        "task_arithmetic": {**ta, "models": [m(v[0], weight=grad), m(v[1], weight=filt)]},
        "ties": {**ta, "models": two},
        "breadcrumbs": {**ta, "models": [m(v[0], weight=0.6, density=0.8, gamma=0.05), m(v[1], weight=0.5, density=0.9)]},
        "breadcrumbs_ties": {**ta, "models": [m(v[0], weight=0.6, density=0.8, gamma=0.05), m(v[1], weight=0.5, density=0.9)]},
        "slerp": {"base_model": str(v[0]), "models": [m(v[0]), m(v[1])], "parameters": {"t": [0, 0.5, 1]}, "dtype": "float32"},
        "nuslerp": {**ta, "models": [m(v[0], weight=0.4), m(v[1], weight=0.6)]},
        "multislerp": {**ta, "models": [m(v[0], weight=0.5), m(v[1], weight=0.3), m(v[2], weight=0.2)]},
        "karcher": {"models": [m(x) for x in v], "dtype": "float32"},
        "model_stock": {**ta, "models": [m(x) for x in v]},
        "sce": {**ta, "models": [m(v[0]), m(v[1])], "parameters": {"select_topk": 0.5}},
        "ram": {**ta, "models": [m(v[0]), m(v[1])]},
        "ramplus_tl": {**ta, "models": [m(v[0]), m(v[1])]},
        "nearswap": {**ta, "models": [m(v[0])], "parameters": {"t": 0.0005}},
        "arcee_fusion": {**ta, "models": [m(v[0])]},
        "passthrough": {"slices": [{"sources": [{"model": str(v[0]), "layer_range": [0, 3]}]},
                                   {"sources": [{"model": str(v[1]), "layer_range": [1, 4]}]}], "dtype": "float32"},
    }  # fmt: skip
    for name in RANDOM:
        out[name] = {
            **ta,
            "models": [m(v[0], weight=1.0, density=0.4)],
            "parameters": {"normalize": False},
        }
    return {k: {"merge_method": k, **r} for k, r in out.items()}


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(largest |difference| over all tensors, how many elements differ by more than 1e-5)."""
    worst, over = 0.0, 0
    for name, t in ours.items():
        d = (t.float() - theirs[name].float()).abs()
        worst, over = max(worst, d.max().item()), over + int((d > 1e-5).sum())
    return worst, over


def run_unode(recipe: dict[str, Any], out: Path, mergekit_ties: bool) -> dict[str, torch.Tensor]:
    """unode's merge of `recipe`, tied elements chosen as mergekit does when `mergekit_ties`."""
    with mergekit_tie_order(mergekit_ties):
        report = merge(copy.deepcopy(recipe), out, force=True, progress=False)
    return load_dir(Path(report.out_dir))


def compare_random(
    ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> str:
    name = "model.layers.1.mlp.down_proj.weight"
    do, dt = ours[name] - base[name], theirs[name] - base[name]
    kept = [(d.abs() > 1e-9).float().mean().item() for d in (do, dt)]
    return f"kept {kept[0]:.3f} vs {kept[1]:.3f}   delta-norm ratio {do.norm().item() / dt.norm().item():.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="")
    ap.add_argument("--own-ties", action="store_true", help="unode's order for tied magnitudes")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    root = Path(tempfile.mkdtemp(prefix="unode-parity-"))
    tok = toymodels.train_tokenizer(512, "bpe")
    base = toymodels.build_model(root / "base", "llama", tokenizer=tok, seed=1)
    variants = [toymodels.make_variant(base, root / f"ft{i}", seed=100 + i) for i in range(3)]
    table = recipes(base, variants)
    chosen = args.methods.split(",") if args.methods else list(table)
    order, other = ("own", "mergekit") if args.own_ties else ("mergekit", "own")
    print(f"tie order: {order}; last column: elements > 1e-5 with the {other} tie order")
    print(f"{'method':<18}{'unode s':>8}{'mergekit s':>11}   result")
    for name in chosen:
        recipe = table[name]
        t0 = time.perf_counter()
        ours = run_unode(recipe, root / f"u-{name}", mergekit_ties=not args.own_ties)
        t1 = time.perf_counter()
        run_merge(MergeConfiguration.model_validate(copy.deepcopy(recipe)), str(root / f"m-{name}"),
                  MergeOptions(lazy_unpickle=False, random_seed=0, quiet=True))  # fmt: skip
        t2 = time.perf_counter()
        theirs = load_dir(root / f"m-{name}")
        if name in RANDOM:
            res = compare_random(ours, theirs, load_dir(base))
        else:
            worst, over = compare(ours, theirs)
            alt = run_unode(recipe, root / f"a-{name}", mergekit_ties=args.own_ties)
            res = f"max |diff| {worst:9.2e}   elements > 1e-5: {over:<4}  ({other} ties: {compare(alt, theirs)[1]})"
        print(f"{name:<18}{t1 - t0:>8.2f}{t2 - t1:>11.2f}   {res}", flush=True)


if __name__ == "__main__":
    main()
