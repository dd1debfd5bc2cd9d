"""Training checkpoints without pickle: weights and optimizer tensors in safetensors, scalars
and hyper-parameters in JSON. Written to a temporary directory and renamed, so a crash mid-save
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model


def save_checkpoint(
    path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    opt_state = opt.state_dict()
    for pid, pstate in opt_state["state"].items():
        for name, value in pstate.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{pid}.{name}"] = t.detach().clone().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {"param_groups": opt_state["param_groups"], "state": state}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    if path.exists():
        old = path.with_name(path.name + ".old")
        path.replace(old)
        tmp.replace(path)
        shutil.rmtree(old)
    else:
        tmp.replace(path)


def load_checkpoint(
    path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore model, optimizer and torch RNG; returns the saved loop state."""
    load_model(model, str(path / "model.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})
    return dict(meta["state"])
