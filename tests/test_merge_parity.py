"""End-to-end parity with mergekit 0.1.5: the same recipe through both tools, tensor by tensor.

mergekit runs in this process (one import for the session, CPU, lazy unpickle off).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from node import toymodels
from node.merge.api import merge
from node.merge.methods import mergekit_tie_order

pytest.importorskip("mergekit")
TOL = 1e-5
Recipe = dict[str, Any]


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="session")
def run_mergekit(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Recipe], Path]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    root = tmp_path_factory.mktemp("mergekit")
    count = [0]

    def run(recipe: Recipe) -> Path:
        count[0] += 1
        out = root / f"out{count[0]}"
        cfg = MergeConfiguration.model_validate(copy.deepcopy(recipe))
        opts = MergeOptions(lazy_unpickle=False, random_seed=0, quiet=True, device="cpu")
        run_merge(cfg, str(out), opts)
        return out

    return run


def both(
    recipe: Recipe, run_mergekit: Callable[[Recipe], Path], tmp: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    ours = merge(copy.deepcopy(recipe), tmp / "unode", progress=False)
    return load_dir(Path(ours.out_dir)), load_dir(run_mergekit(recipe))


def assert_parity(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Every tensor within TOL of mergekit's (mergekit also writes tied output heads out)."""
    assert ours, "no tensors"
    for name, t in ours.items():
        assert name in theirs, f"mergekit has no {name}"
        assert t.shape == theirs[name].shape, name
        bad = ((t.float() - theirs[name].float()).abs() > TOL).sum().item()
        assert bad == 0, f"{name}: {bad} elements differ by more than {TOL}"
    assert set(theirs) - set(ours) <= {"lm_head.weight"}


def m(path: Path, **params: Any) -> dict[str, Any]:
    return {"model": str(path), "parameters": params} if params else {"model": str(path)}


FILTERED = [{"filter": "mlp", "value": 0.7}, {"value": 0.4}]


def deterministic_cases(fam: Any) -> dict[str, Recipe]:
    b, (v0, v1, v2) = fam.base, fam.variants
    ta = {"base_model": str(b), "dtype": "float32"}
    return {
        "linear": {
            "merge_method": "linear",
            "models": [m(b, weight=0.2), m(v0, weight=[0.3, 0.9]), m(v1, weight=FILTERED)],
            "dtype": "float32",
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            **ta,
            "models": [m(v0, weight=[0.5, 1.0]), m(v1, weight=0.7)],
            "parameters": {"lambda": 0.9},
        },
        "ties": {
            "merge_method": "ties",
            **ta,
            "models": [
                m(v0, weight=0.6, density=[0.3, 0.8]),
                m(v1, weight=0.5, density=[{"filter": "self_attn", "value": 0.5}, {"value": 0.7}]),
            ],
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            **ta,
            "models": [m(v0, weight=0.6, density=0.8, gamma=0.05), m(v1, weight=0.5, density=0.9)],
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            **ta,
            "models": [m(v0, weight=0.6, density=0.8, gamma=0.05), m(v1, weight=0.5, density=0.9)],
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": str(v0),
            "models": [m(v0), m(v1)],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]},
            "dtype": "float32",
        },
        "nuslerp": {
            "merge_method": "nuslerp",
            **ta,
            "models": [m(v0, weight=0.4), m(v1, weight=0.6)],
        },
        "multislerp": {
            "merge_method": "multislerp",
            **ta,
            "models": [m(v0, weight=0.5), m(v1, weight=0.3), m(v2, weight=0.2)],
        },
        "karcher": {"merge_method": "karcher", "models": [m(v0), m(v1), m(v2)], "dtype": "float32"},
        "model_stock": {"merge_method": "model_stock", **ta, "models": [m(v0), m(v1), m(v2)]},
        "sce": {
            "merge_method": "sce",
            **ta,
            "models": [m(v0), m(v1)],
            "parameters": {"select_topk": 0.5},
        },
        "ram": {"merge_method": "ram", **ta, "models": [m(v0), m(v1)]},
        "ramplus_tl": {"merge_method": "ramplus_tl", **ta, "models": [m(v0), m(v1)]},
        "nearswap": {
            "merge_method": "nearswap",
            **ta,
            "models": [m(v0)],
            "parameters": {"t": 0.0005},
        },
        "arcee_fusion": {"merge_method": "arcee_fusion", **ta, "models": [m(v0)]},
    }


CASES = list(
    deterministic_cases(
        type("F", (), {"base": Path("b"), "variants": (Path("0"), Path("1"), Path("2"))})()
    )
)


@pytest.mark.parametrize("method", CASES)
def test_deterministic_method_matches_mergekit(
    method: str, llama_family: Any, run_mergekit: Callable[[Recipe], Path], tmp_path: Path
) -> None:
    recipe = deterministic_cases(llama_family)[method]
    with mergekit_tie_order():  # elements tied at a sparsification cut: mergekit's choice
        ours, theirs = both(recipe, run_mergekit, tmp_path)
    assert_parity(ours, theirs)
    base = load_dir(llama_family.base)
    moved = max((ours[k] - base[k]).abs().max().item() for k in ours)
    assert moved > 1e-4  # the merge did something: parity is not base == base


def test_passthrough_frankenmerge_matches_mergekit(
    llama_family: Any, run_mergekit: Callable[[Recipe], Path], tmp_path: Path
) -> None:
    v0, v1 = llama_family.variants[:2]
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(v0), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(v1), "layer_range": [1, 4]}]},
        ],
        "dtype": "float32",
    }
    ours, theirs = both(recipe, run_mergekit, tmp_path)
    assert_parity(ours, theirs)
    src1 = load_dir(v1)
    assert torch.equal(
        ours["model.layers.5.mlp.up_proj.weight"], src1["model.layers.3.mlp.up_proj.weight"]
    )
    assert torch.equal(ours["lm_head.weight"], src1["lm_head.weight"])  # post weights: last slice
    assert not any(".layers.6." in k for k in ours)


def test_slices_with_linear_and_gradients_match_mergekit(
    llama_family: Any, run_mergekit: Callable[[Recipe], Path], tmp_path: Path
) -> None:
    b, v0 = llama_family.base, llama_family.variants[0]
    recipe = {
        "merge_method": "linear",
        "slices": [
            {"sources": [{"model": str(b), "layer_range": [0, 2], "parameters": {"weight": [1.0, 0.0]}},
                         {"model": str(v0), "layer_range": [0, 2], "parameters": {"weight": [0.0, 1.0]}}]},
            {"sources": [{"model": str(b), "layer_range": [2, 4]}, {"model": str(v0), "layer_range": [2, 4]}],
             "parameters": {"weight": [{"filter": "self_attn", "value": 0.25}, {"value": 0.5}]}},
        ],
        "dtype": "float32",
    }  # fmt: skip
    ours, theirs = both(recipe, run_mergekit, tmp_path)
    assert_parity(ours, theirs)
    base = load_dir(b)
    name = "model.layers.0.mlp.up_proj.weight"  # t = 0 in slice 0: all base
    assert torch.equal(ours[name], base[name])


def test_qwen2_and_gpt2_task_arithmetic_match_mergekit(
    qwen2_family: Any, gpt2_family: Any, run_mergekit: Callable[[Recipe], Path], tmp_path: Path
) -> None:
    for i, fam in enumerate((qwen2_family, gpt2_family)):
        recipe = {"merge_method": "task_arithmetic", "base_model": str(fam.base), "dtype": "float32",
                  "models": [m(v, weight=[0.3, 0.8]) for v in fam.variants]}  # fmt: skip
        ours, theirs = both(recipe, run_mergekit, tmp_path / str(i))
        assert_parity(ours, theirs)


@pytest.fixture(scope="session")
def llama_other_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama model of the same shape with a different BPE vocabulary (600 tokens, other text)."""
    text = toymodels.shipped_text()
    tok = toymodels.train_tokenizer(vocab_size=600, kind="bpe", text=text[len(text) // 2 :])
    return toymodels.build_model(
        tmp_path_factory.mktemp("llama_tok2") / "m", "llama", tokenizer=tok, seed=9
    )


@pytest.mark.parametrize("source", ["union", "base"])
def test_tokenizer_source_matches_mergekit_by_token(
    source: str,
    llama_family: Any,
    llama_other_tokenizer: Path,
    run_mergekit: Callable[[Recipe], Path],
    tmp_path: Path,
) -> None:
    from transformers import AutoTokenizer

    b, other = llama_family.base, llama_other_tokenizer
    recipe = {"merge_method": "linear", "base_model": str(b), "models": [m(b, weight=0.6), m(other, weight=0.4)],
              "tokenizer_source": source, "dtype": "float32"}  # fmt: skip
    ours_out = Path(merge(copy.deepcopy(recipe), tmp_path / "unode", progress=False).out_dir)
    theirs_out = run_mergekit(recipe)
    ours, theirs = load_dir(ours_out), load_dir(theirs_out)
    v_ours = AutoTokenizer.from_pretrained(ours_out).get_vocab()
    v_theirs = AutoTokenizer.from_pretrained(theirs_out).get_vocab()
    assert set(v_ours) == set(v_theirs)
    if source == "union":
        assert len(v_ours) > 600
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert ours[name].shape[0] == len(v_ours)
        idx_o = torch.tensor([v_ours[t] for t in sorted(v_ours)])
        idx_t = torch.tensor([v_theirs[t] for t in sorted(v_ours)])
        diff = (ours[name][idx_o] - theirs[name][idx_t]).abs().max().item()
        assert diff <= TOL, f"{name}: {diff}"
    rest = {k: v for k, v in ours.items() if "embed" not in k and "lm_head" not in k}
    assert_parity(rest, {k: v for k, v in theirs.items() if k in rest or k == "lm_head.weight"})


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_agree_with_mergekit_in_distribution(
    method: str, llama_family: Any, run_mergekit: Callable[[Recipe], Path], tmp_path: Path
) -> None:
    b, v0 = llama_family.base, llama_family.variants[0]
    recipe = {"merge_method": method, "base_model": str(b), "dtype": "float32",
              "models": [m(v0, weight=1.0, density=0.4)], "parameters": {"normalize": False}}  # fmt: skip
    ours, theirs = both(recipe, run_mergekit, tmp_path)
    base, ft = load_dir(b), load_dir(v0)
    name = "model.layers.1.mlp.down_proj.weight"
    d_ours, d_theirs, delta = (
        ours[name] - base[name],
        theirs[name] - base[name],
        ft[name] - base[name],
    )
    kept_ours = (d_ours.abs() > 1e-9).float().mean().item()
    kept_theirs = (d_theirs.abs() > 1e-9).float().mean().item()
    assert abs(kept_ours - 0.4) < 0.03 and abs(kept_theirs - 0.4) < 0.03
    ratio = d_ours.norm().item() / d_theirs.norm().item()
    assert 0.9 < ratio < 1.1, ratio  # rescaled by 1/keep probability in both
    assert d_ours.norm().item() > delta.norm().item()  # rescaling made the kept part larger
