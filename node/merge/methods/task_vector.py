"""One task-vector engine and its configurations: task arithmetic, TIES, DARE, breadcrumbs, DELLA.

Per tensor: task vectors (model - base) → sparsify → weight → optional sign consensus →
sum → optional normalize by the (kept) weights → times lambda → plus base, as mergekit's
GeneralizedTaskArithmeticMerge does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from node.errors import UserError
from node.merge.methods import sparsify
from node.merge.methods.base import InputRule, MergeInputs, ParamSpec, non_base_keys
from node.merge.methods.params import check_density, read_model_params, read_params

# name -> (task vector, its per-model values, generator) -> sparsified task vector (in place)
Sparsifier = Callable[[torch.Tensor, dict[str, Any], torch.Generator | None], torch.Tensor]


def _magnitude(delta: torch.Tensor, p: dict[str, Any], _g: torch.Generator | None) -> torch.Tensor:
    return sparsify.magnitude(delta, p["density"], p["rescale"])


def _random(delta: torch.Tensor, p: dict[str, Any], g: torch.Generator | None) -> torch.Tensor:
    return sparsify.random_drop(delta, p["density"], p["rescale"], g)


def _outliers(delta: torch.Tensor, p: dict[str, Any], _g: torch.Generator | None) -> torch.Tensor:
    return sparsify.magnitude_outliers(delta, p["density"], p["gamma"], p["rescale"])


def _della(delta: torch.Tensor, p: dict[str, Any], g: torch.Generator | None) -> torch.Tensor:
    density, epsilon = p["density"], p["epsilon"]
    if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise UserError(
            "parameters.epsilon",
            epsilon,
            f"choose epsilon so that density ± epsilon lies in (0, 1) (density is {density})",
        )
    return sparsify.della_magprune(delta, density, epsilon, p["rescale"], g)


SPARSIFIERS: dict[str, Sparsifier] = {
    "magnitude": _magnitude,
    "random": _random,
    "magnitude_outliers": _outliers,
    "della_magprune": _della,
}
EXTRA_PARAMS = {
    "magnitude_outliers": ParamSpec(
        "gamma", 0.01, "fraction of largest-magnitude outliers removed first", kind=float
    ),
    "della_magprune": ParamSpec(
        "epsilon", 0.15, "keep probability spread: density ± epsilon by magnitude rank", kind=float
    ),
}


class TaskVectorMerge:
    """A configuration of the engine: which sparsifier, sign consensus, and defaults."""

    requires_base: bool = True
    inputs: InputRule = InputRule(base="required")

    def __init__(
        self,
        name: str,
        sparsifier: str | None,
        consensus: bool,
        default_normalize: bool,
        default_rescale: bool,
    ) -> None:
        self.name = name
        self.sparsifier, self.consensus = sparsifier, consensus
        self.global_params: tuple[ParamSpec, ...] = (
            ParamSpec(
                "int8_mask", False, "store the sign mask as int8 (no effect on values)", bool
            ),
            ParamSpec("normalize", default_normalize, "divide by the sum of (kept) weights", bool),
            ParamSpec("rescale", default_rescale, "rescale kept values to the l1 norm", bool),
            ParamSpec("lambda", 1.0, "multiplies the merged task vector", float),
        )
        per_model = [
            ParamSpec("weight", doc="coefficient of this model's task vector", kind=float),
            ParamSpec("density", 1.0, "fraction of the task vector kept", float),
        ]
        if sparsifier in EXTRA_PARAMS:
            per_model.append(EXTRA_PARAMS[sparsifier])
        self.model_params: tuple[ParamSpec, ...] = tuple(per_model)

    def __repr__(self) -> str:
        return f"TaskVectorMerge({self.name!r})"

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        if inputs.base is None:
            raise UserError("base_model", None, f"{self.name} needs a base_model", "missing")
        base = inputs.tensors[inputs.base]
        keys = non_base_keys(inputs)
        if not keys:
            return base.clone()
        params = read_params(self.global_params, inputs)
        per_model = read_model_params(self.model_params, inputs, keys)
        deltas = self._sparse_deltas(inputs, keys, base, params["rescale"], per_model)
        weights = per_model["weight"]
        for delta, weight in zip(deltas, weights, strict=True):
            delta.mul_(weight)  # a scalar per model: broadcasting an (N, 1, ...) tensor is slower
        if self.consensus:
            mixed = consensus_mix(deltas, weights, params["normalize"])
        else:
            mixed = model_sum(deltas, into_first=True)
            divisor = torch.tensor(weights).view(-1, *([1] * base.dim())).sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
            if params["normalize"]:
                mixed /= divisor
        del deltas
        if params["lambda"] != 1:
            mixed *= params["lambda"]
        return mixed.add_(base)

    def _sparse_deltas(
        self,
        inputs: MergeInputs,
        keys: tuple[str, ...],
        base: torch.Tensor,
        rescale: bool,
        per_model: dict[str, list[Any]],
    ) -> list[torch.Tensor]:
        """One task vector per model, each sparsified in place.

        Owned inputs (`MergeInputs.owned`) become their task vectors in place; otherwise the
        task vectors are new tensors and the inputs are left untouched.
        """
        if self.sparsifier is not None:
            check_density(per_model["density"], keys)
        deltas = []
        for index, key in enumerate(keys):
            x = inputs.tensors[key]
            delta = x.sub_(base) if inputs.owned else torch.sub(x, base)
            if self.sparsifier is not None:
                values = {name: per_model[name][index] for name in per_model}
                values["rescale"] = rescale
                SPARSIFIERS[self.sparsifier](delta, values, inputs.generator)
            deltas.append(delta)
        return deltas


SEQUENTIAL_SUM = 4  # up to this many terms torch's sum over dim 0 adds them in order


def model_sum(deltas: Sequence[torch.Tensor] | torch.Tensor, into_first: bool) -> torch.Tensor:
    """Elementwise sum over models, bit for bit `torch.stack(deltas).sum(dim=0)`.

    Up to `SEQUENTIAL_SUM` terms it is a running sum (into `deltas[0]` when `into_first`, the
    caller giving that tensor up), so no stacked copy of every task vector is made.
    """
    if isinstance(deltas, torch.Tensor):
        return deltas.sum(dim=0)
    if len(deltas) > SEQUENTIAL_SUM:  # torch's cascade sum regroups more terms: stack them
        stacked = torch.stack(list(deltas))
        return torch.sum(stacked, dim=0, out=deltas[0]) if into_first else stacked.sum(dim=0)
    if len(deltas) == 1:
        return deltas[0] if into_first else deltas[0].clone()
    total = deltas[0].add_(deltas[1]) if into_first else torch.add(deltas[0], deltas[1])
    for delta in deltas[2:]:
        total.add_(delta)
    return total


def sign_consensus_sum(
    deltas: Sequence[torch.Tensor] | torch.Tensor,
    weights: list[float],
    weighted: bool,
    reuse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the entries whose sign agrees with the sign of the sum of deltas (TIES, SCE).

    Returns (sum of agreeing deltas, times their weight unless `weighted` says the deltas
    already carry it; sum of the agreeing weights, 0 replaced by 1). Zero entries never
    agree; a positive-or-zero sum elects +1. Same sums as mergekit's float sign mask,
    built with float compares per model (bool `where` and broadcast mixed-dtype products
    are ~10x slower on CPU). `reuse`: the caller gives up `deltas[0]`, which becomes the sum.
    """
    shape = deltas[0].shape
    elected = model_sum(deltas, into_first=False)
    torch.ge(elected, 0, out=elected).mul_(2).sub_(1)  # ±1
    divisor, agree = torch.empty(shape), torch.empty(shape)
    mixed = deltas[0] if reuse else torch.empty(shape)
    for index, (delta, weight) in enumerate(zip(deltas, weights, strict=True)):
        torch.mul(delta, elected, out=agree)
        torch.gt(agree, 0, out=agree)  # 1.0 where the sign agrees
        if index == 0:  # (0 + x is x: starting from the first term skips two fills)
            torch.mul(delta, agree if weighted else agree * weight, out=mixed)
            torch.mul(agree, weight, out=divisor)
            continue
        mixed.addcmul_(delta, agree, value=1.0 if weighted else weight)
        divisor.add_(agree, alpha=weight)
    return mixed, divisor


CONSENSUS_BLOCK = 1 << 18  # elements per block: the temporaries stay in cache


def consensus_mix(
    deltas: list[torch.Tensor], weights: list[float], normalize: bool
) -> torch.Tensor:
    """The engine's sign consensus: `sign_consensus_sum(deltas, weights, weighted=True,
    reuse=True)`, divided by the agreeing weights (0 -> 1) when `normalize`, into `deltas[0]`.

    A block at a time with block-sized temporaries (every op is elementwise, so the values
    are the whole-tensor ones); the divisor is only computed when it divides.
    """
    if len(deltas) > SEQUENTIAL_SUM or not all(d.is_contiguous() for d in deltas):
        mixed, divisor = sign_consensus_sum(deltas, weights, weighted=True, reuse=True)
        if normalize:
            mixed /= divisor.add_(torch.eq(divisor, 0, out=torch.empty(divisor.shape)))
        return mixed
    flats = [d.view(-1) for d in deltas]
    n = flats[0].numel()
    size = min(CONSENSUS_BLOCK, n)
    elected, agree, divisor = torch.empty(size), torch.empty(size), torch.empty(size)
    for a in range(0, n, CONSENSUS_BLOCK):
        block = [f[a : a + CONSENSUS_BLOCK] for f in flats]
        m = block[0].numel()
        e, g, d = elected[:m], agree[:m], divisor[:m]
        torch.add(block[0], block[1], out=e) if len(block) > 1 else e.copy_(block[0])
        for x in block[2:]:
            e.add_(x)  # model_sum's running order
        torch.ge(e, 0, out=e).mul_(2).sub_(1)  # ±1
        for index, (x, weight) in enumerate(zip(block, weights, strict=True)):
            torch.gt(torch.mul(x, e, out=g), 0, out=g)  # 1.0 where the sign agrees
            if index == 0:  # block[0] becomes the sum (it is only read for its own term)
                x.mul_(g)
                if normalize:
                    torch.mul(g, weight, out=d)
                continue
            block[0].addcmul_(x, g, value=1.0)
            if normalize:
                d.add_(g, alpha=weight)
        if normalize:
            block[0].div_(d.add_(torch.eq(d, 0, out=g)))  # no agreeing weight: 0 -> 1
    return deltas[0]


TASK_VECTOR_METHODS = (
    TaskVectorMerge("task_arithmetic", None, False, False, False),
    TaskVectorMerge("ties", "magnitude", True, True, False),
    TaskVectorMerge("dare_ties", "random", True, False, True),
    TaskVectorMerge("dare_linear", "random", False, False, True),
    TaskVectorMerge("breadcrumbs", "magnitude_outliers", False, False, False),
    TaskVectorMerge("breadcrumbs_ties", "magnitude_outliers", True, False, False),
    TaskVectorMerge("della", "della_magprune", True, True, True),
    TaskVectorMerge("della_linear", "della_magprune", False, False, True),
)
