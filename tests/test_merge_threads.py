"""Every merge method gives bit-identical tensors whatever the torch thread count.

Peers with different core counts verify each other's units by hash; a reduction that splits
its work per thread would make honest peers disagree in the last bits.
"""

from __future__ import annotations

import pytest
import torch

from node.merge.methods import get_method, method_names
from node.merge.methods.base import MergeInputs, tensor_generator
from node.merge.methods.reduce import stable_dot, stable_norm, stable_sum

PAIRWISE = {"slerp", "arcee_fusion", "nearswap"}  # base + exactly one other model
PARAMS = {"slerp": {"t": 0.3}, "nuslerp": {}, "nearswap": {"t": 0.001}}


def _inputs(name: str, shape: tuple[int, ...]) -> MergeInputs:
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=gen)
    tensors = {k: base + 0.01 * torch.randn(shape, generator=gen) for k in ("a", "b")}
    tensors["base"] = base
    if name == "nuslerp":
        models: tuple[str, ...] = ("a", "b")
    else:
        models = ("b", "base") if name in PAIRWISE else ("a", "b", "base")
    return MergeInputs(
        name="model.layers.0.mlp.up_proj.weight",
        models=models,
        tensors=tensors,
        base=None if name == "nuslerp" else "base",
        model_params={k: {"weight": 0.5, "density": 0.5} for k in ("a", "b", "base")},
        params=PARAMS.get(name, {}),
        generator=tensor_generator(0, "model.layers.0.mlp.up_proj.weight"),
    )


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("shape", [(512, 640), (300_000,)])
@pytest.mark.parametrize("name", [m for m in method_names() if m != "passthrough"])
def test_method_is_thread_count_independent(name, shape, restore_threads):
    outs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        inputs = _inputs(name, shape)
        outs.append(get_method(name).merge(inputs))
    assert all(torch.equal(outs[0], other) for other in outs[1:])


def test_stable_reductions_equal_float64_reference(restore_threads):
    gen = torch.Generator().manual_seed(3)
    for n in (0, 1, 16383, 16384, 16385, 1_000_003):
        x, y = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
        got = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got.append((stable_sum(x), stable_dot(x, y), stable_norm(x)))
        assert got[0] == got[1]
        ref = (x.double().sum(), (x.double() * y.double()).sum(), x.double().norm())
        for value, expected in zip(got[0], ref, strict=True):
            assert float(value) == pytest.approx(float(expected), rel=1e-5, abs=1e-3)
