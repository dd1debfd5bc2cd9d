"""The contract between a merge method and the executor that feeds it one tensor at a time.

A method never reads files, never sees other tensors, and draws randomness only from
`MergeInputs.generator`, which the executor seeds from (recipe seed, tensor name).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

REQUIRED: Any = object()  # sentinel default: the recipe must give a value


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a method accepts, with mergekit's name and default."""

    name: str
    default: Any = REQUIRED
    doc: str = ""
    # Added by the methods helper (defaults keep older constructions valid):
    kind: type | None = None  # float, int or bool: what `read_params` coerces to; None = as given
    applies_to_base: bool = False  # per-model only: the base takes it too (mergekit INPUT scope)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class InputRule:
    """Which inputs a method accepts (mergekit's InputContract), checked before merging.

    `base` is "required", "optional" or "ignored" (ignored: the base, when the recipe names
    one, is just one more input, as mergekit's planner appends it to the models).
    """

    base: str = "ignored"
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None


@dataclass(frozen=True)
class MergeInputs:
    """Everything a method needs to merge one tensor.

    `models` lists the input model keys in recipe order (the base included when it is
    also listed under `models`); `tensors` maps every key, the base's included, to its
    tensor (float32, same shape). `model_params[key]` holds the resolved per-model
    parameters for this tensor; `params` the resolved method-level parameters.

    `owned`: the caller gives the float tensors up to the method, which may then overwrite
    them (and return one of them) to save memory; they must not share storage. Not owned
    (the default), a method never modifies its inputs.
    """

    name: str
    models: tuple[str, ...]
    tensors: dict[str, torch.Tensor]
    base: str | None = None
    model_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    generator: torch.Generator | None = None
    owned: bool = False


class MergeMethod(Protocol):
    """A merge method: a name, the parameters it takes, and a pure per-tensor function."""

    name: str
    requires_base: bool
    global_params: tuple[ParamSpec, ...]
    model_params: tuple[ParamSpec, ...]
    inputs: InputRule

    def merge(self, inputs: MergeInputs) -> torch.Tensor: ...


def tensor_generator(seed: int, tensor_name: str) -> torch.Generator:
    """A CPU generator derived from (seed, tensor name) only.

    Any peer can recompute any tensor bit for bit, whatever the order in which the
    tensors are merged or where: the networked rounds rely on this to verify each other.
    """
    digest = hashlib.sha256(f"unode-merge/{int(seed)}/{tensor_name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def input_keys(inputs: MergeInputs) -> tuple[str, ...]:
    """Every input in mergekit's order: the recipe's models, then the base if not listed."""
    if inputs.base is not None and inputs.base not in inputs.models:
        return (*inputs.models, inputs.base)
    return inputs.models


def non_base_keys(inputs: MergeInputs) -> tuple[str, ...]:
    """The inputs other than the base, in recipe order."""
    return tuple(key for key in inputs.models if key != inputs.base)
