"""Real pretrained tokenizers available offline: GPT-2 BPE (openai-whisper's sdist), Mistral
SentencePiece 32k (mistral-common's wheel), and any GGUF's tokenizer (SmolLM2, Gemma-3).

`fetch()` (run by `make real`) gets the two files with pip and keeps only them in the cache;
the loaders never touch the network.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from node.errors import UserError
from node.importer.packaged import cache_dir as gguf_cache_dir

GPT2_FILE, MISTRAL_FILE = "gpt2.tiktoken", "mistral-tokenizer.model.v1"
# GPT-2's pre-tokenizer split, as its encoder.py and tiktoken's "gpt2" encoding define it
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SOURCES = {  # file -> (pip requirement, pip download flags, member path in the archive)
    GPT2_FILE: (
        "openai-whisper==20250625",
        ["--no-binary", ":all:"],
        "whisper/assets/gpt2.tiktoken",
    ),
    MISTRAL_FILE: ("mistral-common==1.13.1", [], "mistral_common/data/tokenizer.model.v1"),
}


def cache_dir() -> Path:
    return gguf_cache_dir().parent / "tokenizers"


def tokenizer_file(name: str) -> Path:
    path = cache_dir() / name
    if not path.is_file():
        raise UserError("tokenizer", name, "run `make real` to fetch the real tokenizer files",
                        f"not in {cache_dir()}")  # fmt: skip
    return path


def _extract(archive: Path, member: str, out: Path) -> None:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            data = z.read(member)
    else:
        with tarfile.open(archive) as t:
            found = next(m for m in t.getmembers() if m.name.endswith(member))
            fobj = t.extractfile(found)
            assert fobj is not None
            data = fobj.read()
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)


def fetch() -> list[Path]:
    """Download the two archives with pip (no dependencies, nothing installed), keep the files."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    done = []
    for name, (req, flags, member) in SOURCES.items():
        out = cache_dir() / name
        if not out.is_file():
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *flags, req, "-d", tmp]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                _extract(next(Path(tmp).iterdir()), member, out)
        done.append(out)
    return done


def gpt2_tokenizer() -> Any:
    """GPT-2's 50257-token byte-level BPE as a fast tokenizer (with offsets)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    conv = TikTokenConverter(str(tokenizer_file(GPT2_FILE)), pattern=GPT2_PATTERN,
                             extra_special_tokens=["<|endoftext|>"])  # type: ignore[no-untyped-call]  # fmt: skip
    eot = "<|endoftext|>"
    backend = conv.converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eot, eos_token=eot)  # type: ignore[no-untyped-call]


def mistral_tokenizer() -> Any:
    """Mistral-7B v0.1's 32k SentencePiece (Llama-style, byte fallback)."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(tokenizer_file(MISTRAL_FILE), Path(tmp) / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(tmp)


def gguf_tokenizer(path: Path) -> Any:
    """The tokenizer a GGUF file carries (no weights are read)."""
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


if __name__ == "__main__":
    for p in fetch():
        print(p)
