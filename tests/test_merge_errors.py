"""Bad input through the real `unode merge` command: exit code 2, one line naming the field,
value and fix, and nothing left behind (no OUT_DIR, no temporary directory)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli import app

UP = "model.layers.0.mlp.up_proj.weight"


def run_cli(tmp: Path, recipe: dict[str, Any] | str, *extra: str) -> tuple[int, str, Path]:
    path = tmp / "recipe.yml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    out = tmp / "work" / "merged"
    out.parent.mkdir(exist_ok=True)
    result = CliRunner().invoke(app, ["merge", str(path), str(out), "--quiet", *extra])
    return result.exit_code, result.stderr.strip(), out


def assert_user_error(tmp: Path, recipe: dict[str, Any] | str, *needles: str) -> str:
    code, err, out = run_cli(tmp, recipe)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary directory left either
    return err


def broken_copy(src: Path, dst: Path, edit: Any) -> Path:
    """A copy of a model whose tensors `edit(dict)` changed."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})
    return dst


def ties(base: Path, *models: Path, **params: Any) -> dict[str, Any]:
    p = {"weight": 0.5, "density": 0.5, **params}
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": p} for m in models],
    }


def test_unknown_method_lists_valid_ones(llama_family: Any, tmp_path: Path) -> None:
    recipe = {**ties(llama_family.base, *llama_family.variants[:2]), "merge_method": "tiez"}
    assert_user_error(
        tmp_path, recipe, "merge_method", "tiez", "linear", "task_arithmetic", "slerp"
    )


def test_missing_base_for_a_method_that_needs_one(llama_family: Any, tmp_path: Path) -> None:
    recipe = ties(llama_family.base, *llama_family.variants[:2])
    del recipe["base_model"]
    assert_user_error(tmp_path, recipe, "base_model", "ties")


@pytest.mark.parametrize("density", [0, 1.5, -0.1])
def test_density_outside_unit_interval(density: float, llama_family: Any, tmp_path: Path) -> None:
    recipe = ties(llama_family.base, *llama_family.variants[:2], density=[0.5, density])
    assert_user_error(tmp_path, recipe, "density", str(density), "(0, 1]")


def test_shape_mismatch_names_the_tensor(llama_family: Any, tmp_path: Path) -> None:
    def shrink(t: dict[str, torch.Tensor]) -> None:
        t[UP] = t[UP][:-1].contiguous()

    bad = broken_copy(llama_family.variants[0], tmp_path / "bad", shrink)
    assert_user_error(tmp_path, ties(llama_family.base, bad), "shape mismatch", UP)


def test_missing_tensor_is_named(llama_family: Any, tmp_path: Path) -> None:
    bad = broken_copy(llama_family.variants[0], tmp_path / "bad", lambda t: t.pop(UP))
    assert_user_error(tmp_path, ties(llama_family.base, bad), UP, "missing", str(bad))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_input_is_refused(value: float, llama_family: Any, tmp_path: Path) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t[UP][3, 5] = value

    bad = broken_copy(llama_family.variants[0], tmp_path / "bad", poison)
    assert_user_error(tmp_path, ties(llama_family.base, bad), "NaN or inf", UP)


def test_truncated_safetensors(llama_family: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(llama_family.variants[0], bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    assert_user_error(tmp_path, ties(llama_family.base, bad), "truncated", "models[0].model")


def test_corrupt_safetensors_header(llama_family: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(llama_family.variants[0], bad)
    f = bad / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:40] = b"#" * 32  # the JSON header no longer parses
    f.write_bytes(bytes(raw))
    assert_user_error(tmp_path, ties(llama_family.base, bad), "not a valid safetensors file")


def test_pickle_checkpoint_is_refused_with_conversion_hint(
    llama_family: Any, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(llama_family.variants[0], bad)
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    err = assert_user_error(tmp_path, ties(llama_family.base, bad), "pickle", "pytorch_model.bin")
    assert "safe_serialization=True" in err


def test_existing_out_dir_needs_force(llama_family: Any, tmp_path: Path) -> None:
    out = tmp_path / "work" / "merged"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    recipe = ties(llama_family.base, *llama_family.variants[:2])
    code, err, _ = run_cli(tmp_path, recipe)
    assert code == 2 and "--force" in err and "already exists" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _, _ = run_cli(tmp_path, recipe, "--force")
    assert code == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]


def test_malformed_yaml(tmp_path: Path) -> None:
    assert_user_error(
        tmp_path, "merge_method: linear\nmodels: [ {model: a\n", "malformed YAML", "line"
    )


def test_different_vocabularies_need_a_tokenizer_setting(llama_family: Any, tmp_path: Path) -> None:
    def grow(t: dict[str, torch.Tensor]) -> None:
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            t[k] = torch.cat([t[k], t[k][:8]]).contiguous()

    bad = broken_copy(llama_family.variants[0], tmp_path / "bad", grow)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 8}))
    assert_user_error(tmp_path, ties(llama_family.base, bad), "tokenizer_source", "vocabulary")
