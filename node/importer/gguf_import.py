"""`import_gguf(src, out_dir)`: a GGUF file → a Hugging Face model directory.

The header is checked first (magic, architecture) so bad input fails in a second; weights are
dequantized by transformers' GGUF loader into the chosen dtype, saved as safetensors with the
config and tokenizer into a temporary directory next to `out_dir`, then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from node.errors import UserError

GGUF_MAGIC = b"GGUF"
DTYPES = ("float32", "bfloat16", "float16")
NOT_CAUSAL_LM = {"general", "tokenizer", "t5", "umt5"}  # loader keys that are no decoder LM
PROVENANCE_NAME = "unode_import.json"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ImportReport:
    """What an import did (printed by `unode import --json`)."""

    source: str
    source_sha256: str
    architecture: str
    model_type: str
    dtype: str
    out_dir: str
    params: int
    vocab_size: int
    tensors: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def supported_architectures() -> list[str]:
    """GGUF `general.architecture` values the installed transformers loads as causal LMs."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - NOT_CAUSAL_LM)


def resolve_gguf(src: Path) -> Path:
    """The GGUF file `src` names: the file itself, or the one `.gguf` file in a directory."""
    src = Path(src)
    if not src.exists():
        raise UserError("GGUF_OR_DIR", str(src), "give an existing .gguf file or a directory",
                        "no such file or directory")  # fmt: skip
    if src.is_dir():
        found = sorted(src.glob("*.gguf"))
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise UserError("GGUF_OR_DIR", str(src), "give the .gguf file itself",
                            f"directory holds {len(found)} .gguf files ({names})")  # fmt: skip
        src = found[0]
    with src.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError("GGUF_OR_DIR", str(src), "give a GGUF model file (it starts with 'GGUF')",
                        f"not a GGUF file (starts with {magic!r})")  # fmt: skip
    return src


def read_architecture(path: Path) -> tuple[str, int]:
    """`general.architecture` and the tensor count from the GGUF header (memory-mapped)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, IndexError, OSError) as err:
        raise UserError("GGUF_OR_DIR", str(path), "give an intact GGUF file",
                        f"unreadable GGUF header: {err}") from err  # fmt: skip
    field = reader.fields.get("general.architecture")
    if field is None:
        raise UserError("GGUF_OR_DIR", str(path), "give a GGUF model file",
                        "no general.architecture in the header")  # fmt: skip
    arch = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return arch, len(reader.tensors)


def check_request(src: Path, out_dir: Path, dtype: str, force: bool) -> tuple[Path, str, int]:
    """Every user-input check, before anything heavy runs or is written."""
    if dtype not in DTYPES:
        raise UserError("--dtype", dtype, f"use one of: {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UserError("OUT_DIR", str(out_dir), "choose a new directory or pass --force",
                        "already exists")  # fmt: skip
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError("OUT_DIR", str(out_dir), "choose a directory path", "is a file")
    path = resolve_gguf(src)
    arch, n_tensors = read_architecture(path)
    supported = supported_architectures()
    if arch not in supported:
        raise UserError("GGUF_OR_DIR", f"{path.name} (architecture {arch})",
                        f"use a GGUF of a supported architecture: {', '.join(supported)}",
                        "unsupported GGUF architecture")  # fmt: skip
    return path, arch, n_tensors


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _stderr(msg: str) -> None:
    print(f"import: {msg}", file=sys.stderr, flush=True)


def _load_and_save(path: Path, tmp: Path, dtype: str, say: Progress) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    say("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    say(f"dequantizing weights to {dtype} (the slow part)")
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=getattr(torch, dtype),
        quantization_config=GgufConfig(gguf_file=str(path), dequantize=True),
    )  # fmt: skip
    wanted = getattr(torch, dtype)
    odd = {str(p.dtype) for p in model.state_dict().values() if p.dtype != wanted}
    if odd:  # an internal invariant of the loader: every weight unpacked into the dtype asked for
        raise RuntimeError(f"GGUF loader left weights in {sorted(odd)}, not {dtype}")
    say(f"writing safetensors to {tmp}")
    # the weights are dequantized already: save them as a plain model, not as a GGUF quantization
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return model, tokenizer


def import_gguf(
    src: Path, out_dir: Path, dtype: str = "float32", force: bool = False,
    progress: Progress | None = _stderr,
) -> ImportReport:  # fmt: skip
    """Import `src` (a GGUF file or a directory holding one) into `out_dir`."""
    t0 = time.perf_counter()
    say: Progress = progress or (lambda _msg: None)
    out_dir = Path(out_dir)
    path, arch, n_tensors = check_request(src, out_dir, dtype, force)
    say(
        f"{path.name}: architecture {arch}, {n_tensors} tensors, {path.stat().st_size / 1e6:.0f} MB"
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.import-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model, tokenizer = _load_and_save(path, tmp, dtype, say)
        report = ImportReport(
            source=str(path), source_sha256=_file_sha256(path), architecture=arch,
            model_type=str(model.config.model_type), dtype=dtype, out_dir=str(out_dir),
            params=sum(p.numel() for p in model.parameters()), vocab_size=len(tokenizer),
            tensors=n_tensors, seconds=round(time.perf_counter() - t0, 2),
        )  # fmt: skip
        (tmp / PROVENANCE_NAME).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.replace(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"done in {report.seconds:.1f}s -> {out_dir}")
    return report
