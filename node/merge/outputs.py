"""Everything written next to the merged weights: config.json (dtype, layer count, vocabulary
updated), generation config, tokenizer files, a model card holding the recipe, and
`unode-lineage.json` (input manifests, recipe hash, seed, unode version, output hashes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from node.merge.architecture import LAYER_COUNT_KEYS, PER_LAYER_CONFIG_KEYS, VOCAB_SIZE_KEYS
from node.merge.recipe import Recipe

LINEAGE_NAME = "unode-lineage.json"
LINEAGE_FORMAT = "unode-merge-lineage/1"
DTYPE_CONFIG = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}


def unode_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unode")
    except PackageNotFoundError:
        return "0+unknown"


def output_config(
    donor: dict[str, Any],
    configs: dict[str, dict[str, Any]],
    dtype: torch.dtype | None,
    layer_sources: list[tuple[str, int]],
    vocab_rows: int | None,
) -> dict[str, Any]:
    """The donor's config.json with dtype, layer count, per-layer lists and vocabulary updated."""
    cfg = json.loads(json.dumps(donor))
    if dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in cfg or key == "dtype":
                cfg[key] = DTYPE_CONFIG[dtype]
    for key in LAYER_COUNT_KEYS:
        if isinstance(cfg.get(key), int):
            cfg[key] = len(layer_sources)
            break
    for key in PER_LAYER_CONFIG_KEYS:
        if isinstance(cfg.get(key), list):
            cfg[key] = [configs[m].get(key, cfg[key])[i] for m, i in layer_sources]
    if vocab_rows is not None:
        for key in VOCAB_SIZE_KEYS:
            if key in cfg:
                cfg[key] = vocab_rows
                break
    return dict(cfg)


def chat_template_of(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = model_dir / "tokenizer_config.json"
    value = json.loads(cfg.read_text()).get("chat_template") if cfg.is_file() else None
    return value if isinstance(value, str) else None


def set_chat_template(out_dir: Path, template: str, model_dirs: list[Path]) -> None:
    """`auto`: the template most input models share (mergekit's rule); else the given text."""
    if template == "auto":
        found = [t.strip() for d in model_dirs if (t := chat_template_of(d))]
        if not found:
            return
        template = max(found, key=found.count)
    cfg = out_dir / "tokenizer_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        data.pop("chat_template", None)
        write_json(cfg, data)
    (out_dir / "chat_template.jinja").write_text(template)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Lineage:
    method: str
    recipe_sha256: str
    seed: int
    inputs: dict[str, str]  # model reference -> manifest sha256 of the tensors read
    output: dict[str, str]  # tensor name -> sha256 of its bytes

    def to_json(self) -> dict[str, Any]:
        out_manifest = hashlib.sha256(
            "".join(f"{k}\0{v}\n" for k, v in sorted(self.output.items())).encode()
        ).hexdigest()
        return {
            "format": LINEAGE_FORMAT,
            "unode_version": unode_version(),
            "method": self.method,
            "recipe_sha256": self.recipe_sha256,
            "seed": self.seed,
            "inputs": [{"model": k, "manifest_sha256": v} for k, v in self.inputs.items()],
            "output_manifest_sha256": out_manifest,
            "output_tensors": self.output,
        }


def lineage_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_card(recipe: Recipe, name: str, lineage: dict[str, Any]) -> str:
    models = "\n".join(f"- `{m}`" for m in recipe.referenced_models())
    return f"""---
library_name: transformers
tags:
- merge
- unode
---
# {name}

A merge of pre-trained language models made with unode (`unode merge`).

## Method

`{recipe.merge_method}`{f" with base model `{recipe.base_model}`" if recipe.base_model else ""}, seed {recipe.seed}.

## Models

{models}

## Recipe

```yaml
{recipe.yaml_text().rstrip()}
```

## Lineage

Recipe sha256 `{lineage["recipe_sha256"]}`; output manifest sha256
`{lineage["output_manifest_sha256"]}`; full record in `{LINEAGE_NAME}`.
"""
