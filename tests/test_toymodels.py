"""The fixtures are real: transformers loads them and the variants differ like fine-tunes."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_llama_family_loads_and_generates(llama_family):
    tok = AutoTokenizer.from_pretrained(llama_family.base)
    model = AutoModelForCausalLM.from_pretrained(llama_family.base)
    ids = tok("def main():", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)
    assert model.config.model_type == "llama"


def test_variants_are_small_deltas(llama_family):
    (f,) = llama_family.base.glob("*.safetensors")
    base = load_file(f)
    ft = load_file(llama_family.variants[0] / f.name)
    assert base.keys() == ft.keys()
    w = "model.layers.0.mlp.up_proj.weight"
    rel = (ft[w] - base[w]).norm() / base[w].norm()
    assert 0.005 < rel < 0.2
    other = load_file(llama_family.variants[1] / f.name)
    assert not torch.equal(ft[w], other[w])


def test_other_architectures(qwen2_family, gpt2_family):
    q = AutoModelForCausalLM.from_pretrained(qwen2_family.base)
    g = AutoModelForCausalLM.from_pretrained(gpt2_family.base)
    assert (q.config.model_type, g.config.model_type) == ("qwen2", "gpt2")
