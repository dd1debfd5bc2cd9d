"""The built-in merge demo: tiny offline models (cached under $UNODE_HOME) merged three ways.

Stands in for the network demo until that lands; finishes in well under a minute.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from node.merge.api import MergeReport, merge


def unode_home() -> Path:
    return Path(os.environ.get("UNODE_HOME") or Path.home() / ".cache" / "unode")


def demo_models(root: Path) -> dict[str, Path]:
    """A tiny Llama-shaped base and two fine-tune-like variants, built once and cached."""
    from node import toymodels

    names = {"base": root / "base", "math": root / "ft-math", "prose": root / "ft-prose"}
    if all((p / "config.json").is_file() for p in names.values()):
        return names
    root.mkdir(parents=True, exist_ok=True)
    tok = toymodels.train_tokenizer(vocab_size=512, kind="bpe")
    for p in names.values():
        if p.exists():
            import shutil

            shutil.rmtree(p)
    toymodels.build_model(names["base"], arch="llama", tokenizer=tok, seed=1)
    toymodels.make_variant(names["base"], names["math"], seed=101)
    toymodels.make_variant(names["base"], names["prose"], seed=102)
    return names


def demo_recipes(m: dict[str, Path]) -> dict[str, dict[str, Any]]:
    base, a, b = str(m["base"]), str(m["math"]), str(m["prose"])
    return {
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": [0.3, 0.7], "density": 0.5}},
                {"model": b, "parameters": {"weight": [0.7, 0.3], "density": 0.5}},
            ],
            "dtype": "float32",
        },
        "dare_ties": {
            "merge_method": "dare_ties",
            "base_model": base,
            "models": [
                {
                    "model": a,
                    "parameters": {
                        "weight": {"layers": [0.2, 0.4, 0.6, 0.8], "default": 0.5},
                        "density": 0.6,
                    },
                },
                {"model": b, "parameters": {"weight": 0.5, "density": 0.6}},
            ],
            "seed": 7,
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": a,
            "models": [{"model": a}, {"model": b}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.5}]},
        },
    }


def run_demo(home: Path | None = None, progress: bool = False) -> list[MergeReport]:
    root = home or unode_home()
    models = demo_models(root / "demo-models")
    return [
        merge(recipe, root / "demo-merges" / name, force=True, progress=progress)
        for name, recipe in demo_recipes(models).items()
    ]
