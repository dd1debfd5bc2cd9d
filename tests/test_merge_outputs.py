"""What `unode merge` writes: loadable Hugging Face models that generate, sharded safetensors,
config/tokenizer/card/lineage files, byte-identical results whatever the order, layer tables."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from node import toymodels
from node.errors import UserError
from node.merge.api import merge
from node.merge.io import TensorMeta
from node.merge.outputs import LINEAGE_NAME


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def dare(fam: Any, seed: int = 3) -> dict[str, Any]:
    return {
        "merge_method": "dare_ties",
        "base_model": str(fam.base),
        "models": [
            {"model": str(v), "parameters": {"weight": [0.4, 0.8], "density": 0.5}}
            for v in fam.variants[:2]
        ],
        "seed": seed,
    }


def generate(model_dir: Path, dtype: torch.dtype = torch.float32) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    ids = tok("The function returns", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id or 0)
    assert out.shape[1] == ids.shape[1] + 6
    return [int(i) for i in out[0, ids.shape[1] :]]


@pytest.mark.parametrize("family", ["llama_family", "qwen2_family", "gpt2_family"])
def test_merged_model_loads_and_generates(
    family: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    fam = request.getfixturevalue(family)
    recipe = {**dare(fam), "out_dtype": "bfloat16"}
    report = merge(recipe, tmp_path / "out", progress=False)
    out = Path(report.out_dir)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_dir(out).values())
    assert len(generate(out)) == 6
    # the loaded weights are the merged ones (nothing re-initialised by transformers)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    state = model.state_dict()
    for name, t in load_dir(out).items():
        assert torch.equal(state[name], t), name


def test_outputs_files_card_and_lineage(llama_family: Any, tmp_path: Path) -> None:
    report = merge(dare(llama_family), tmp_path / "out", progress=False)
    out = Path(report.out_dir)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md", LINEAGE_NAME,
            "model.safetensors", "model.safetensors.index.json"} <= names  # fmt: skip
    lineage = json.loads((out / LINEAGE_NAME).read_text())
    assert lineage["method"] == "dare_ties" and lineage["seed"] == 3
    assert lineage["recipe_sha256"] == report.recipe_sha256
    assert [i["model"] for i in lineage["inputs"]] == [
        str(llama_family.base),
        *map(str, llama_family.variants[:2]),
    ]
    assert set(lineage["output_tensors"]) == set(load_dir(out))
    card = (out / "README.md").read_text()
    assert "dare_ties" in card and str(llama_family.variants[0]) in card and "density" in card
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(lineage["output_tensors"])
    # another input changes its manifest hash and the output's, not the recipe's format
    other = merge(
        {
            **dare(llama_family),
            "models": [{"model": str(llama_family.variants[2]), "parameters": {"weight": 1.0}}],
        },
        tmp_path / "o2",
        progress=False,
    )
    lineage2 = json.loads((Path(other.out_dir) / LINEAGE_NAME).read_text())
    assert lineage2["inputs"][0] == lineage["inputs"][0]  # same base, same manifest
    assert lineage2["inputs"][1]["manifest_sha256"] != lineage["inputs"][1]["manifest_sha256"]


def test_same_recipe_any_order_is_byte_identical(llama_family: Any, tmp_path: Path) -> None:
    a = Path(merge(dare(llama_family), tmp_path / "a", progress=False).out_dir)
    n = a.joinpath("model.safetensors.index.json").read_text().count('": "model')
    b = Path(
        merge(
            dare(llama_family), tmp_path / "b", progress=False, order=list(reversed(range(n)))
        ).out_dir
    )
    for f in ("model.safetensors", "model.safetensors.index.json", LINEAGE_NAME, "config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = Path(merge(dare(llama_family, seed=4), tmp_path / "c", progress=False).out_dir)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_sharded_input_and_output(llama_family: Any, bpe_tokenizer: Any, tmp_path: Path) -> None:
    sharded = toymodels.build_model(
        tmp_path / "sharded", "llama", tokenizer=bpe_tokenizer, seed=1, max_shard_size=200_000
    )
    assert (sharded / "model.safetensors.index.json").is_file()
    plain = toymodels.build_model(tmp_path / "plain", "llama", tokenizer=bpe_tokenizer, seed=1)
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(sharded), "parameters": {"weight": 1.0}},
            {"model": str(llama_family.variants[0]), "parameters": {"weight": 1.0}},
        ],
    }
    r1 = merge(recipe, tmp_path / "o1", progress=False, shard_bytes=300_000)
    recipe["models"][0]["model"] = str(plain)  # type: ignore[index]
    r2 = merge(recipe, tmp_path / "o2", progress=False)
    out1, out2 = Path(r1.out_dir), Path(r2.out_dir)
    assert len(list(out1.glob("model-*-of-*.safetensors"))) >= 3
    t1, t2 = load_dir(out1), load_dir(out2)
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert len(generate(out1)) == 6


def test_per_layer_table_selects_models_per_layer(llama_family: Any, tmp_path: Path) -> None:
    b, v0 = llama_family.base, llama_family.variants[0]
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(b), "parameters": {"weight": {"layers": [1, 0, 0, 1], "default": 1}}},
            {"model": str(v0), "parameters": {"weight": [{"filter": "mlp", "value": {"layers": [0, 1, 0.5, 0]}}, {"value": {"layers": [0, 1, 1, 0], "default": 0}}]}},
        ],
    }  # fmt: skip
    out = load_dir(Path(merge(recipe, tmp_path / "o", progress=False).out_dir))
    tb, tv = load_dir(b), load_dir(v0)
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.3.mlp.up_proj.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
    ):
        assert torch.equal(out[name], tb[name]), name
    for name in (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.2.self_attn.o_proj.weight",
    ):
        assert torch.allclose(out[name], tv[name], atol=0), name
    name = "model.layers.2.mlp.down_proj.weight"  # base 0, v0 0.5, normalized: all v0
    assert torch.allclose(out[name], tv[name])
    recipe["models"][0]["parameters"]["weight"]["layers"] = [1, 0, 0]  # type: ignore[index]
    with pytest.raises(UserError, match="exactly 4 values"):
        merge(recipe, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_passthrough_slices_set_layer_count_and_generate(llama_family: Any, tmp_path: Path) -> None:
    v0, v1 = llama_family.variants[:2]
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(v0), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(v1), "layer_range": [1, 4]}]}]}  # fmt: skip
    out = Path(merge(recipe, tmp_path / "o", progress=False).out_dir)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    assert len(generate(out)) == 6


def test_cli_json_summary(llama_family: Any, tmp_path: Path) -> None:
    import yaml

    (tmp_path / "r.yml").write_text(yaml.safe_dump(dare(llama_family)))
    result = CliRunner().invoke(
        app, ["merge", str(tmp_path / "r.yml"), str(tmp_path / "o"), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["method"] == "dare_ties" and summary["tensors"] == 39
    assert summary["params"] == sum(t.numel() for t in load_dir(tmp_path / "o").values())
    assert summary["out_dir"] == str(tmp_path / "o") and len(summary["lineage_sha256"]) == 64
    assert result.stderr == ""  # no progress bar when stderr is not a terminal


def test_chat_template_text_is_installed(llama_family: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    out = Path(
        merge(
            {**dare(llama_family), "chat_template": template}, tmp_path / "o", progress=False
        ).out_dir
    )
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False)
    assert text == "[user] 2+2?\n"
    with pytest.raises(UserError, match="chat_template"):
        merge({**dare(llama_family), "chat_template": "chatml"}, tmp_path / "o2", progress=False)


class MemorySource:
    """A TensorSource that is not a local directory (as a peer's expert will be)."""

    def __init__(self, ref: str, model_dir: Path) -> None:
        self.ref, self.meta_dir = ref, model_dir
        self.tensors = load_dir(model_dir)
        self.reads: list[str] = []

    def names(self) -> list[str]:
        return list(self.tensors)

    def meta(self, name: str) -> TensorMeta:
        return TensorMeta(tuple(self.tensors[name].shape), self.tensors[name].dtype)

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        self.reads.append(name)
        return self.tensors[name].clone()

    def digest(self) -> str:
        return "memory:" + self.ref


def test_tensor_sources_can_come_from_elsewhere(llama_family: Any, tmp_path: Path) -> None:
    local = dare(llama_family)
    remote = copy.deepcopy(local)
    remote["models"][1]["model"] = "unode://expert-1"
    src = MemorySource("unode://expert-1", llama_family.variants[1])
    a = Path(merge(local, tmp_path / "a", progress=False).out_dir)
    b = Path(
        merge(remote, tmp_path / "b", progress=False, sources={"unode://expert-1": src}).out_dir
    )
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert sorted(src.reads) == sorted(src.tensors)
    assert {
        "model": "unode://expert-1",
        "manifest_sha256": "memory:unode://expert-1",
    } in json.loads((b / LINEAGE_NAME).read_text())["inputs"]
    with pytest.raises(UserError, match="unode://expert-1"):
        merge(remote, tmp_path / "c", progress=False)
