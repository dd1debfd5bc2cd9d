"""`unode import`: GGUF → Hugging Face directory, on a tiny Llama GGUF the test writes itself
with the `gguf` package (so CI tests the import path without the model packages), plus the
error contract (exit 2, one line, nothing partial left).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from node import toymodels
from node.errors import UserError
from node.importer.gguf_import import PROVENANCE_NAME, import_gguf, supported_architectures

gguf = pytest.importorskip("gguf")
TEXT = "The quick brown fox: def f(x): return x + 1  # ok"


def _permute_for_gguf(w: torch.Tensor, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows with each head's rotary halves interleaved."""
    out = w.reshape(n_head, 2, w.shape[0] // n_head // 2, w.shape[1]).transpose(1, 2)
    return out.reshape(w.shape).numpy()


def _tokenizer_fields(tok: Any) -> tuple[list[str], list[str], list[int]]:
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = set(tok.all_special_tokens)
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    return tokens, merges, [int(t) for t in types]


def write_tiny_gguf(model_dir: Path, out: Path, arch_name: str = "llama") -> Path:
    """Write a toymodels Llama as an F32 GGUF (llama.cpp's tensor names and q/k layout)."""
    from transformers import AutoConfig, AutoTokenizer

    cfg, tok = AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    w = gguf.GGUFWriter(str(out), arch_name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tokens, merges, types = _tokenizer_fields(tok)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, t in load_file(str(model_dir / "model.safetensors")).items():
        arr = t.float().numpy()
        if name.endswith("q_proj.weight"):
            arr = _permute_for_gguf(t.float(), cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            arr = _permute_for_gguf(t.float(), cfg.num_key_value_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer: Any) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gguf")
    model_dir = toymodels.build_model(root / "hf", "llama", tokenizer=bpe_tokenizer, seed=3)
    return model_dir, write_tiny_gguf(model_dir, root / "tiny.gguf")


def test_import_round_trips_weights_tokenizer_and_logits(
    tiny_gguf: tuple[Path, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, path = tiny_gguf
    report = import_gguf(path.parent, tmp_path / "out", progress=None)  # the directory form
    out = Path(report.out_dir)
    assert report.architecture == "llama" and report.model_type == "llama"
    assert json.loads((out / PROVENANCE_NAME).read_text())["source_sha256"] == report.source_sha256
    orig, imported = load_file(str(model_dir / "model.safetensors")), {}
    for f in out.glob("*.safetensors"):
        imported.update(load_file(str(f)))
    assert sorted(imported) == sorted(orig)
    for name, t in orig.items():
        torch.testing.assert_close(imported[name], t, rtol=0, atol=0, msg=name)
    tok_a, tok_b = AutoTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(out)
    ids = tok_a(TEXT, add_special_tokens=False)["input_ids"]
    assert tok_b(TEXT, add_special_tokens=False)["input_ids"] == ids
    assert (tok_b.bos_token_id, tok_b.eos_token_id) == (tok_a.bos_token_id, tok_a.eos_token_id)
    x = torch.tensor([[tok_a.bos_token_id, *ids]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(model_dir)(x).logits
        b = AutoModelForCausalLM.from_pretrained(out)(x).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_import_cli_bfloat16_json_and_force(tiny_gguf: tuple[Path, Path], tmp_path: Path) -> None:
    _, path = tiny_gguf
    out = tmp_path / "bf16"
    res = CliRunner().invoke(app, ["import", str(path), str(out), "--dtype", "bfloat16", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    # transformers' GGUF "gpt2" tokenizer converter adds <|endoftext|> when the vocab lacks it
    assert info["dtype"] == "bfloat16" and info["vocab_size"] == 512 + 1
    assert {t.dtype for f in out.glob("*.safetensors") for t in load_file(str(f)).values()} == {
        torch.bfloat16
    }
    again = CliRunner().invoke(app, ["import", str(path), str(out)])
    assert again.exit_code == 2 and "OUT_DIR" in again.stderr and "--force" in again.stderr
    forced = CliRunner().invoke(app, ["import", str(path), str(out), "--force", "-q"])
    assert forced.exit_code == 0, forced.output
    assert "imported llama" in forced.stdout
    assert not list(tmp_path.glob(".*import-tmp"))


def _cli_error(args: list[str]) -> str:
    res = CliRunner().invoke(app, ["import", *args])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_import_errors_are_one_line_and_leave_nothing(tmp_path: Path) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    assert "not a GGUF file" in _cli_error([str(not_gguf), str(tmp_path / "o1")])
    assert "no such file" in _cli_error([str(tmp_path / "missing.gguf"), str(tmp_path / "o2")])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "0 .gguf files" in _cli_error([str(empty), str(tmp_path / "o3")])
    bert = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(bert), "bert")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    line = _cli_error([str(bert), str(tmp_path / "o4")])
    assert "unsupported GGUF architecture" in line and "bert" in line and "llama" in line
    assert "--dtype" in _cli_error([str(bert), str(tmp_path / "o5"), "--dtype", "int8"])
    assert "unknown packaged model" in _cli_error(["pkg:nope", str(tmp_path / "o6")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.gguf", "empty", "model.gguf"]


def test_import_failure_midway_leaves_nothing(tiny_gguf: tuple[Path, Path], tmp_path: Path) -> None:
    """A GGUF whose header is fine but whose weights do not fit its config fails cleanly."""
    model_dir, _ = tiny_gguf
    bad = write_tiny_gguf(model_dir, tmp_path / "bad.gguf")
    data = bytearray(bad.read_bytes())
    bad.write_bytes(bytes(data[: len(data) // 2]))  # truncated tensor data
    with pytest.raises((UserError, ValueError, OSError, RuntimeError)):
        import_gguf(bad, tmp_path / "out", progress=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_supported_architectures_are_decoder_lms() -> None:
    archs = supported_architectures()
    assert {"llama", "gemma3", "qwen2", "mistral"} <= set(archs)
    assert not {"general", "tokenizer", "t5"} & set(archs)
