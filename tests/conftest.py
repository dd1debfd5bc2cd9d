"""Session fixtures: tiny real transformers models and tokenizers, built offline.

Every model directory holds safetensors weights, config.json and a trained tokenizer, so
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from node import toymodels


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread than on two contended ones (a module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class Family:
    """A base model and fine-tune-like variants of it (one architecture, one tokenizer)."""

    arch: str
    base: Path
    variants: tuple[Path, ...]


@pytest.fixture(scope="session")
def bpe_tokenizer() -> Any:
    return toymodels.train_tokenizer(vocab_size=512, kind="bpe")


@pytest.fixture(scope="session")
def unigram_tokenizer() -> Any:
    return toymodels.train_tokenizer(vocab_size=600, kind="unigram")


def _family(root: Path, arch: toymodels.Arch, tokenizer: Any, n_variants: int) -> Family:
    base = toymodels.build_model(root / "base", arch=arch, tokenizer=tokenizer, seed=1)
    variants = tuple(
        toymodels.make_variant(base, root / f"ft{i}", seed=100 + i) for i in range(n_variants)
    )
    return Family(arch=arch, base=base, variants=variants)


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer: Any) -> Family:
    """A Llama-shaped base (4 layers, hidden 64, vocab 512) and three fine-tune-like variants."""
    return _family(tmp_path_factory.mktemp("llama"), "llama", bpe_tokenizer, 3)


@pytest.fixture(scope="session")
def qwen2_family(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer: Any) -> Family:
    """A Qwen2-shaped base (attention biases) and two variants."""
    return _family(tmp_path_factory.mktemp("qwen2"), "qwen2", bpe_tokenizer, 2)


@pytest.fixture(scope="session")
def gpt2_family(tmp_path_factory: pytest.TempPathFactory, unigram_tokenizer: Any) -> Family:
    """A GPT-2-shaped base (fused qkv, tied embeddings, unigram tokenizer) and two variants."""
    return _family(tmp_path_factory.mktemp("gpt2"), "gpt2", unigram_tokenizer, 2)
