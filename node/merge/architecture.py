"""Where a tensor sits in a causal LM, read from its name and config.json (data, not if-chains).

Layer tensors are `<prefix>.<index>.<rest>` under one of `LAYER_CONTAINERS`; non-layer tensors
sit before the stack (embeddings) or after it (`POST_LAYER`: final norm, output head); tensors
with a vocabulary axis (`VOCAB_TENSORS`) are row-remapped when tokenizers differ.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# The module names that hold the repeated decoder blocks across transformers causal LMs
# (llama/mistral/qwen/gemma: layers, gpt2/falcon/bloom: h, mpt: blocks).
LAYER_CONTAINERS = ("layers", "h", "blocks", "layer")
LAYER_RE = re.compile(
    r"^(?P<prefix>(?:[\w-]+\.)*?(?:"
    + "|".join(LAYER_CONTAINERS)
    + r")\.)(?P<index>\d+)\.(?P<rest>.+)$"
)
# Config keys that give the number of decoder blocks / the vocabulary size, by convention.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
VOCAB_SIZE_KEYS = ("vocab_size", "padded_vocab_size")
# Config entries holding one item per layer, remapped when slices restack layers.
PER_LAYER_CONFIG_KEYS = ("layer_types",)
# Non-layer tensors after the stack: in slice recipes they come from the last slice.
POST_LAYER = re.compile(r"(^|\.)(norm|ln_f|final_layernorm|final_layer_norm|lm_head|embed_out)\.")
# Tensors indexed by token id along axis 0.
VOCAB_TENSORS = re.compile(
    r"(^|\.)(embed_tokens|wte|lm_head|embed_in|embed_out|word_embeddings|tok_embeddings)\.weight$"
)
# A tied output head missing from a checkpoint reads the input embedding instead.
TIED_HEADS = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight")
}


@dataclass(frozen=True)
class TensorPlace:
    layer: int | None  # None: not inside the decoder stack
    prefix: str = ""
    rest: str = ""
    post: bool = False  # after the stack (final norm, lm_head)

    def renamed(self, layer: int) -> str:
        return f"{self.prefix}{layer}.{self.rest}"


def place(name: str) -> TensorPlace:
    m = LAYER_RE.match(name)
    if m:
        return TensorPlace(int(m["index"]), m["prefix"], m["rest"])
    return TensorPlace(None, post=bool(POST_LAYER.search(name)))


def is_vocab_tensor(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and place(name).layer is None and bool(VOCAB_TENSORS.search(name))


def config_value(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        text = config.get("text_config")
        if isinstance(text, dict) and isinstance(text.get(key), int):
            return int(text[key])
    return None


@dataclass(frozen=True)
class Layout:
    """A model's tensors grouped as pre-stack, per-layer (by index) and post-stack names."""

    pre: tuple[str, ...]
    layers: dict[int, tuple[str, ...]]  # layer index -> names, sorted
    post: tuple[str, ...]

    @property
    def n_layers(self) -> int:
        return max(self.layers) + 1 if self.layers else 0

    def ordered(self) -> list[str]:
        return [*self.pre, *(n for i in sorted(self.layers) for n in self.layers[i]), *self.post]


def layout(names: list[str]) -> Layout:
    pre: list[str] = []
    post: list[str] = []
    layers: dict[int, list[str]] = {}
    for name in names:
        p = place(name)
        if p.layer is not None:
            layers.setdefault(p.layer, []).append(name)
        elif p.post:
            post.append(name)
        else:
            pre.append(name)
    return Layout(
        tuple(sorted(pre)),
        {i: tuple(sorted(v)) for i, v in sorted(layers.items())},
        tuple(sorted(post)),
    )
