"""Sparsifiers and the task-vector engine: hand-computed values, exact selection on large
tensors (against mergekit's sort-based functions), randomized methods in distribution,
seeded determinism, edge cases and user errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from node.errors import UserError
from node.merge.methods import check_inputs, get_method, method_names, rank_range, select, sparsify
from node.merge.methods.base import MergeInputs, tensor_generator
from node.merge.methods.sce import population_variance

mergekit_sparsify = pytest.importorskip("mergekit.sparsify")  # the `bench` extra


def merge(method: str, tensors: dict[str, torch.Tensor], **kw: Any) -> torch.Tensor:
    models = tuple(k for k in tensors if k != "base")
    inputs = MergeInputs(
        name=kw.pop("name", "w"), models=models, tensors=tensors, base="base", **kw
    )
    return get_method(method).merge(inputs)


# --- hand-computed values -------------------------------------------------------------


def test_ties_sign_election_by_hand() -> None:
    base = torch.zeros(2, 3)
    a = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])
    b = torch.tensor([[-3.0, -1.0, 1.0], [0.5, 2.0, 4.0]])
    per_model = {"a": {"weight": 1.0, "density": 1.0}, "b": {"weight": 1.0, "density": 1.0}}
    got = merge("ties", {"base": base, "a": a, "b": b}, model_params=per_model)
    # sums: [-2, -3, 4], [1, 2, 3] -> elected signs -,-,+ / +,+,+; agreeing entries averaged
    # (normalize defaults to true for ties): -3 | (-2-1)/2 | (3+1)/2 ; (0.5+0.5)/2 | 2 | 4
    expected = torch.tensor([[-3.0, -1.5, 2.0], [0.5, 2.0, 4.0]])
    torch.testing.assert_close(got, expected)


def test_ties_density_drops_small_entries_by_hand() -> None:
    base = torch.zeros(4)
    a = torch.tensor([4.0, -1.0, 0.5, -3.0])  # density 0.5 keeps 4 and -3
    b = torch.tensor([-2.0, 1.0, 0.25, 1.0])  # density 0.5 keeps -2 and one of the 1s (index 1)
    per_model = {"a": {"weight": 1.0, "density": 0.5}, "b": {"weight": 0.5, "density": 0.5}}
    got = merge("ties", {"base": base, "a": a, "b": b}, model_params=per_model)
    # weighted: a [4, 0, 0, -3], b [-1, 0.5, 0, 0]; sums [3, .5, 0, -3] -> signs +,+,+,-
    expected = torch.tensor([4.0, 1.0, 0.0, -3.0])  # 0.5/0.5 at index 1 (normalized by b's weight)
    torch.testing.assert_close(got, expected)


def test_task_arithmetic_and_linear_by_hand() -> None:
    base = torch.tensor([1.0, 2.0])
    tensors = {"base": base, "a": torch.tensor([2.0, 2.0]), "b": torch.tensor([1.0, 5.0])}
    per_model = {"a": {"weight": 0.5}, "b": {"weight": -1.0}}
    got = merge("task_arithmetic", tensors, model_params=per_model, params={"lambda": 2.0})
    torch.testing.assert_close(got, torch.tensor([1.0 + 2 * 0.5, 2.0 + 2 * -3.0]))
    linear = get_method("linear").merge(
        MergeInputs(
            "w", ("a", "b"), tensors, model_params={"a": {"weight": 1.0}, "b": {"weight": 3.0}}
        )
    )
    torch.testing.assert_close(linear, torch.tensor([1.25, 4.25]))


def test_breadcrumbs_cuts_both_ends_by_hand() -> None:
    delta = torch.arange(1.0, 11.0)  # |x| ranks 0..9; density 0.5, gamma 0.1: drop 10, keep 5..9
    got = sparsify.magnitude_outliers(delta.clone(), density=0.5, gamma=0.1, rescale=False)
    torch.testing.assert_close(got, torch.tensor([0, 0, 0, 0, 5, 6, 7, 8, 9, 0.0]))
    # density + gamma > 1: fewer outliers are dropped so that density is kept
    got = sparsify.magnitude_outliers(delta.clone(), density=0.95, gamma=0.2, rescale=False)
    assert int(torch.count_nonzero(got)) == 9 and got[-1] == 0


def test_magnitude_takes_ties_at_the_cut_in_index_order() -> None:
    delta = torch.tensor([3.0, -3.0, 3.0, 1.0, -3.0])
    got = sparsify.magnitude(delta.clone(), density=0.4, rescale=False)  # k = 2
    torch.testing.assert_close(got, torch.tensor([3.0, -3.0, 0.0, 0.0, 0.0]))
    got = sparsify.magnitude(delta.clone(), density=0.4, rescale=True)  # l1 13 -> 6: x 13/6
    torch.testing.assert_close(got, torch.tensor([6.5, -6.5, 0.0, 0.0, 0.0]))


# --- exact selection on large tensors (the bracketing fast path) ----------------------


def _skewed(n: int, kind: int) -> torch.Tensor:
    """Inputs that stress the sample bracket: normal, heavy-tailed, sorted (a strided
    sample is unrepresentative), bf16-rounded (many ties), 90% zeros."""
    g = torch.Generator().manual_seed(1)
    if kind == 2:
        return torch.linspace(0, 1, n)
    x = torch.randn(n, generator=g)
    if kind == 1:
        return x**5
    if kind == 3:
        return x.to(torch.bfloat16).float()
    if kind == 4:
        return torch.where(torch.rand(n, generator=g) < 0.9, 0.0, x)
    return x


@pytest.mark.parametrize("kind", range(5), ids=["normal", "heavy", "sorted", "bf16", "zeros"])
def test_kth_smallest_is_exact(kind: int) -> None:
    w = _skewed(100_000, kind).abs()
    for rank in (1, 17, 50_000, 99_000, 100_000):
        found = select.kth_smallest(w, rank)
        value = torch.kthvalue(w, rank).values
        assert found.value == float(value)
        assert found.less == int((w < value).sum()) and found.equal == int((w == value).sum())


@pytest.mark.parametrize("kind", range(5), ids=["normal", "heavy", "sorted", "bf16", "zeros"])
def test_masks_equal_a_stable_sort(kind: int) -> None:
    w = _skewed(100_000, kind).abs()
    ascending = torch.sort(w, stable=True).indices
    for start, stop in ((0, 1000), (40_000, 99_000), (50_000, 50_001)):
        expected = torch.zeros(w.numel(), dtype=torch.bool)
        expected[ascending[start:stop]] = True
        assert torch.equal(rank_range.rank_range_mask(w, start, stop), expected.float())
    descending = torch.sort(w, descending=True, stable=True).indices
    for k in (1, 50_000, 99_999):
        expected = torch.zeros(w.numel(), dtype=torch.bool)
        expected[descending[:k]] = True
        assert torch.equal(select.top_count_mask(w, k), expected.float())


@pytest.mark.parametrize("kind", [3, 4], ids=["bf16", "zeros"])
@pytest.mark.parametrize("n", [100_000, 300_007])  # one block / many (with a short last one)
def test_in_place_magnitude_selection_equals_a_stable_sort(
    kind: int, n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocked, in-place selection (cuts found in one pass, ties located across blocks)
    keeps exactly the elements a stable sort of |x| ranks in range, signs included, and
    leaves no trace of the magnitudes in the input (n < 2 * SAMPLE: an unstrided sample)."""
    monkeypatch.setattr(rank_range, "BLOCK", 1 << 12 if n > 100_000 else rank_range.BLOCK)
    delta = _skewed(n, kind)
    ascending = torch.sort(delta.abs(), stable=True).indices
    for start, stop in ((n // 10, n - n // 100), (0, n // 3), (n // 2, n)):
        expected = torch.zeros(n)
        expected[ascending[start:stop]] = 1.0
        got = rank_range.keep_magnitude_range(delta.clone(), start, stop)
        assert torch.equal(got, delta * expected)
    descending = torch.sort(delta.abs(), descending=True, stable=True).indices
    for k in (1, n // 2, n - 1):
        expected = torch.zeros(n)
        expected[descending[:k]] = 1.0
        assert torch.equal(rank_range.keep_top_magnitudes(delta.clone(), k), delta * expected)


@pytest.mark.parametrize("kind", [0, 1, 2])  # no ties: mergekit's choice is then unique
def test_magnitude_and_outliers_equal_mergekit_on_large_tensors(kind: int) -> None:
    delta = _skewed(100_000, kind).view(200, 500)
    for density in (0.1, 0.7):
        ours = sparsify.magnitude(delta.clone(), density, rescale=True)
        theirs = mergekit_sparsify.magnitude(delta, density, mergekit_sparsify.RescaleNorm.l1)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        ours = sparsify.magnitude_outliers(delta.clone(), density, 0.02, rescale=False)
        theirs = mergekit_sparsify.magnitude_outliers(delta, density, None, gamma=0.02)
        assert torch.equal(ours, theirs)


def test_selection_with_ties_keeps_mergekits_count_and_untied_choices() -> None:
    delta = _skewed(100_000, 3)  # bf16 grid: many equal magnitudes at every cut
    ours = sparsify.magnitude(delta.clone(), 0.3, rescale=False)
    theirs = mergekit_sparsify.magnitude(delta, 0.3, None)
    assert torch.count_nonzero(ours) == torch.count_nonzero(theirs) == 30_000
    cut = ours.abs()[ours != 0].min()
    untied = delta.abs() != cut
    assert torch.equal(ours[untied], theirs[untied])


# --- randomized methods: distribution, determinism ------------------------------------


@pytest.mark.parametrize("rescale", [True, False])
def test_blocked_dare_equals_one_whole_draw_and_mask(rescale: bool) -> None:
    """random_drop works a block at a time (3 blocks here, the last not a whole row of the
    stable sums): the same bits as drawing the whole mask and applying it at once."""
    n = 2 * (1 << 20) + 16_387
    delta = torch.randn(n, generator=torch.Generator().manual_seed(4))
    delta[::7] = 0.0
    got = sparsify.random_drop(delta.clone(), 0.3, rescale, torch.Generator().manual_seed(9))
    keep = sparsify.bernoulli_mask(delta.shape, 0.3, torch.Generator().manual_seed(9))
    expected = sparsify.apply_mask(delta.clone(), delta.abs(), keep, rescale)
    assert torch.equal(got, expected) and torch.equal(got.signbit(), expected.signbit())
    assert 0.29 < float(torch.count_nonzero(got)) / (n - (n + 6) // 7) < 0.31


def test_dare_keeps_density_and_rescaled_expectation() -> None:
    delta = torch.randn(400_000, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(0)
    ours = sparsify.random_drop(delta.clone(), 0.3, rescale=True, generator=g)
    torch.manual_seed(0)  # mergekit draws from the global generator
    theirs = mergekit_sparsify.bernoulli(delta, 0.3, mergekit_sparsify.RescaleNorm.l1)
    for result in (ours, theirs):
        assert abs(float(torch.count_nonzero(result)) / delta.numel() - 0.3) < 0.005
        torch.testing.assert_close(result.abs().sum(), delta.abs().sum())  # l1 restored
        kept = result != 0
        torch.testing.assert_close(
            result[kept], delta[kept] * float(result.abs().sum() / delta[kept].abs().sum())
        )
    no_rescale = sparsify.random_drop(delta.clone(), 0.3, rescale=False, generator=g)
    kept = no_rescale != 0
    assert torch.equal(no_rescale[kept], delta[kept])


def _kept_by_decile(result: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    decile = ranks * 10 // delta.shape[1]
    return torch.stack([(result != 0)[decile == d].float().mean() for d in range(10)])


def test_della_keep_probability_rises_with_rank_like_mergekit() -> None:
    delta = torch.randn(400, 1000, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(0)
    ours = sparsify.della_magprune(delta.clone(), 0.5, 0.2, rescale=True, generator=g)
    torch.manual_seed(0)  # mergekit draws from the global generator
    theirs = mergekit_sparsify.della_magprune(delta, 0.5, 0.2, mergekit_sparsify.RescaleNorm.l1)
    expected = 0.3 + 0.4 * (torch.arange(10) + 0.5) / 10  # linear in rank, 0.3 .. 0.7
    torch.testing.assert_close(_kept_by_decile(ours, delta), expected, atol=0.01, rtol=0)
    torch.testing.assert_close(_kept_by_decile(theirs, delta), expected, atol=0.01, rtol=0)
    torch.testing.assert_close(ours.abs().sum(), delta.abs().sum())
    one_d = sparsify.della_magprune(delta[0].clone(), 0.5, 0.2, rescale=False, generator=g)
    assert one_d.shape == (1000,) and 400 < int(torch.count_nonzero(one_d)) < 600


@pytest.mark.parametrize("shape", [(403, 257), (6, 35, 9)])
def test_della_blocks_of_rows_draw_as_one_whole_tensor(
    shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    whole = sparsify.della_magprune(delta.clone(), 0.4, 0.1, True, tensor_generator(1, "w"))
    monkeypatch.setattr(sparsify, "DELLA_BLOCK", 1000)  # blocks of 4 (x257) or 28 (x35) rows
    blocks = sparsify.della_magprune(delta.clone(), 0.4, 0.1, True, tensor_generator(1, "w"))
    assert torch.equal(blocks, whole) and 0 < int(torch.count_nonzero(whole)) < delta.numel()


RANDOMIZED = ["dare_ties", "dare_linear", "della", "della_linear"]


@pytest.mark.parametrize("method", RANDOMIZED)
def test_randomized_methods_are_seeded_per_tensor(method: str) -> None:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(64, 32, generator=g)
    tensors = {"base": base, **{m: base + torch.randn(64, 32, generator=g) for m in "ab"}}
    per_model = {m: {"weight": 0.5, "density": 0.5} for m in "ab"}

    def run(seed: int, name: str) -> torch.Tensor:
        return merge(
            method,
            tensors,
            name=name,
            model_params=per_model,
            generator=tensor_generator(seed, name),
        )

    first = run(7, "model.layers.0.mlp.up_proj.weight")
    assert torch.equal(first, run(7, "model.layers.0.mlp.up_proj.weight"))  # bit-identical
    assert not torch.equal(first, run(7, "model.layers.1.mlp.up_proj.weight"))
    assert not torch.equal(first, run(8, "model.layers.0.mlp.up_proj.weight"))


@pytest.mark.parametrize("method", RANDOMIZED)
def test_randomized_methods_at_density_one_are_deterministic(method: str) -> None:
    g = torch.Generator().manual_seed(6)
    base = torch.randn(50, generator=g)
    tensors = {"base": base, **{m: base + torch.randn(50, generator=g) for m in "ab"}}
    per_model = {m: {"weight": 0.7, "density": 1.0} for m in "ab"}
    consensus = "ties" if method in ("dare_ties", "della") else "task_arithmetic"
    params = {"normalize": method == "della"}
    expected = merge(consensus, tensors, model_params=per_model, params=params)
    torch.testing.assert_close(
        merge(method, tensors, model_params=per_model, params=params), expected
    )


# --- edge cases -----------------------------------------------------------------------


def test_density_one_keeps_everything() -> None:
    delta = torch.randn(1000)
    assert torch.equal(sparsify.magnitude(delta.clone(), 1.0, True), delta)
    assert torch.equal(sparsify.magnitude_outliers(delta.clone(), 1.0, 0.1, True), delta)
    assert torch.equal(sparsify.random_drop(delta.clone(), 1.0, True, None), delta)
    assert torch.equal(sparsify.della_magprune(delta.clone(), 1.0, 0.1, True, None), delta)


def test_slerp_of_parallel_vectors_is_linear() -> None:
    v = torch.randn(10, 4)
    tensors = {"base": v, "other": 3 * v}
    got = get_method("slerp").merge(
        MergeInputs("w", ("base", "other"), tensors, "base", params={"t": 0.25})
    )
    torch.testing.assert_close(got, 0.75 * v + 0.25 * 3 * v)
    antiparallel = {"base": v, "other": -v}
    got = get_method("slerp").merge(
        MergeInputs("w", ("base", "other"), antiparallel, "base", params={"t": 0.5})
    )
    torch.testing.assert_close(got, torch.zeros_like(v))


@pytest.mark.parametrize(
    "method",
    [
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "sce",
        "ram",
        "ramplus_tl",
    ],
)
def test_zero_task_vectors_give_the_base(method: str) -> None:
    base = torch.randn(8, 6)
    tensors = {"base": base, "a": base.clone(), "b": base.clone()}
    per_model = (
        {m: {"weight": 1.0, "density": 0.5} for m in "ab"}
        if method not in ("sce", "ram", "ramplus_tl")
        else {}
    )
    got = merge(method, tensors, model_params=per_model, generator=tensor_generator(0, "w"))
    assert torch.equal(got, base)


def test_methods_never_modify_their_inputs() -> None:
    g = torch.Generator().manual_seed(9)
    base = torch.randn(12, 10, generator=g)
    tensors = {"base": base, "a": base + torch.randn(12, 10, generator=g), "b": base + 1}
    copies = {k: v.clone() for k, v in tensors.items()}
    methods = ("ties", "dare_ties", "della", "breadcrumbs_ties", "sce", "multislerp", "ram")
    for method in (*methods, "task_arithmetic", "breadcrumbs", "linear"):
        per_model = {m: {"weight": 0.5, "density": 0.5} for m in ("a", "b", "base")}
        merge(method, tensors, model_params=per_model, generator=tensor_generator(0, "w"))
    merge("slerp", {"base": tensors["base"], "a": tensors["a"]}, params={"t": 0.3})
    assert all(torch.equal(tensors[k], copies[k]) for k in tensors)


OWNED_METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "dare_ties", "dare_linear")
OWNED_METHODS += ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "linear")
OWNED_CASES = [
    *((method, n) for method in OWNED_METHODS for n in (1, 2, 3, 5)),  # 5: a stacked sum
    ("slerp", 1),
]


@pytest.mark.parametrize(("method", "n"), OWNED_CASES)
def test_owned_inputs_give_the_same_bits(method: str, n: int) -> None:
    """Merging into owned inputs changes no bit of the result, for any number of models."""
    g = torch.Generator().manual_seed(n)
    base = torch.randn(64, 48, generator=g)
    tensors = {"base": base} | {f"m{i}": base + torch.randn(64, 48, generator=g) for i in range(n)}
    per_model = {k: {"weight": 0.3 + 0.2 * i, "density": 0.6} for i, k in enumerate(tensors)}
    kw: dict[str, Any] = {"params": {"t": 0.3}} if method == "slerp" else {}
    if method != "slerp":
        kw["model_params"] = per_model
    expected = merge(method, tensors, generator=tensor_generator(3, "w"), **kw)
    owned = {k: v.clone() for k, v in tensors.items()}
    ptrs = {v.data_ptr() for v in owned.values()}
    got = merge(method, owned, generator=tensor_generator(3, "w"), owned=True, **kw)
    assert torch.equal(got, expected)
    assert got.data_ptr() in ptrs  # merged into an input: no new full-size result


# --- user errors ----------------------------------------------------------------------


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(UserError, match=r"merge_method.*tie.*use one of: arcee_fusion") as info:
        get_method("tie")
    assert all(name in str(info.value) for name in method_names())


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_out_of_range_is_a_user_error(density: float) -> None:
    tensors = {"base": torch.zeros(4), "a": torch.ones(4)}
    with pytest.raises(UserError, match=r"models\[a\]\.parameters\.density"):
        merge("ties", tensors, model_params={"a": {"weight": 1.0, "density": density}})


def test_della_epsilon_too_wide_is_a_user_error() -> None:
    tensors = {"base": torch.zeros(4), "a": torch.ones(4)}
    with pytest.raises(UserError, match="epsilon"):
        merge("della", tensors, model_params={"a": {"weight": 1.0, "density": 0.2, "epsilon": 0.3}})


def test_missing_weight_and_bad_types_are_user_errors() -> None:
    tensors = {"base": torch.zeros(4), "a": torch.ones(4)}
    with pytest.raises(UserError, match=r"models\[a\]\.parameters\.weight.*missing"):
        merge("task_arithmetic", tensors)
    with pytest.raises(UserError, match=r"parameters\.normalize"):
        merge("ties", tensors, model_params={"a": {"weight": 1.0}}, params={"normalize": "yes"})


def test_check_inputs_rejects_what_mergekit_rejects() -> None:
    check_inputs(get_method("ties"), ["a", "b"], "base")
    check_inputs(get_method("linear"), ["a", "b"], None)
    with pytest.raises(UserError, match=r"base_model.*ties needs a base_model"):
        check_inputs(get_method("ties"), ["a", "b"], None)
    with pytest.raises(UserError, match="slerp takes exactly 2 input models"):
        check_inputs(get_method("slerp"), ["a", "b", "c"], "a")
    with pytest.raises(UserError, match="nuslerp takes exactly 2 non-base models"):
        check_inputs(get_method("nuslerp"), ["a", "b", "c"], None)
    with pytest.raises(UserError, match="model_stock takes at least 3 input models"):
        check_inputs(get_method("model_stock"), ["a"], "base")
    check_inputs(get_method("slerp"), ["a"], "base")  # the base not listed still counts


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_sce_variance_is_torch_var_bit_for_bit(count: int) -> None:
    g = torch.Generator().manual_seed(count)
    deltas = torch.randn(count, 70_000, generator=g) * 0.01 + torch.randn(1, 70_000, generator=g)
    expected = torch.var(deltas, dim=0, unbiased=False)
    assert torch.equal(population_variance(deltas), expected)


@pytest.mark.parametrize("shape", [(1,), (7,), (2, 1), (3, 5, 4), (16, 40, 3)])
def test_della_ranks_along_dim_one_for_any_shape(shape: tuple[int, ...]) -> None:
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(12))
    got = sparsify.della_magprune(delta.clone(), 0.5, 0.2, True, torch.Generator().manual_seed(0))
    assert got.shape == delta.shape
    kept = got != 0
    scale = got[kept] / delta[kept]  # one l1 rescale factor for the whole tensor
    if scale.numel():
        torch.testing.assert_close(scale, torch.full_like(scale, float(scale[0])))
    if delta.dim() == 3 and delta.shape[1] > 20:  # the largest along dim 1 are kept more often
        ranks = delta.abs().argsort(dim=1).argsort(dim=1)
        top = kept[ranks >= delta.shape[1] // 2].float().mean()
        bottom = kept[ranks < delta.shape[1] // 2].float().mean()
        assert top > bottom + 0.1
