"""FuseChat: fuse each source into a pivot separately (pivot + that source as candidates), then
merge the fused copies with SCE through the merge engine (`node.merge.api.merge`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from node.errors import UserError
from node.fusion.summary_store import SummaryReader, model_sha256, write_json_atomic
from node.fusion.train import FuseConfig, fuse, validate, work_dir


def split_summaries(pivot: Path, summaries: list[Path]) -> tuple[list[Path], list[Path]]:
    """(summaries of the pivot itself, summaries of the other sources), by weights hash."""
    digest = model_sha256(pivot)
    own: list[Path] = []
    others: list[Path] = []
    for s in summaries:
        (
            own if SummaryReader(s, verify=False).manifest["model_sha256"] == digest else others
        ).append(s)
    if not others:
        raise UserError(
            "--summaries", [str(s) for s in summaries], "add summaries of at least one other model"
        )
    return own, others


def sce_recipe(pivot: Path, fused: list[Path], select_topk: float) -> dict[str, Any]:
    return {
        "merge_method": "sce",
        "base_model": str(pivot),
        "models": [{"model": str(p)} for p in fused],
        "parameters": {"select_topk": select_topk},
        "dtype": "float32",
    }


def fuse_pairwise(cfg: FuseConfig, select_topk: float = 1.0) -> Path | None:
    """Run the FuseChat pipeline into `cfg.out`; None if a pair run stopped early (`stop_after`)."""
    from node.merge.api import merge

    if not 0.0 < select_topk <= 1.0:
        raise UserError("--sce-topk", select_topk, "use a fraction in (0, 1]")
    validate(cfg)
    own, others = split_summaries(Path(cfg.target), list(cfg.summaries))
    if len(others) == 1 and select_topk < 1.0:
        raise UserError(
            "--sce-topk",
            select_topk,
            "use 1.0 with a single source (SCE selects by variance across fused copies; "
            "with one copy every variance is 0 and nothing would be kept)",
        )
    work = work_dir(Path(cfg.out))
    work.mkdir(parents=True, exist_ok=True)
    fused = []
    for i, src in enumerate(others):
        pair_out = work / f"pair-{i}"
        if not (pair_out / "lineage.json").exists():
            pair_cfg = dataclasses.replace(
                cfg, summaries=[*own, src], out=pair_out, resume=work_dir(pair_out).exists()
            )
            if fuse(pair_cfg) is None:
                return None
        fused.append(pair_out)
    merged = work / "merged"
    if merged.exists():
        shutil.rmtree(merged)
    merge(sce_recipe(Path(cfg.target), fused, select_topk), merged, progress=cfg.progress)
    pairs = [json.loads((p / "lineage.json").read_text()) for p in fused]
    write_json_atomic(
        merged / "fusion_lineage.json",
        {"kind": "fusechat", "pivot": str(cfg.target), "select_topk": select_topk, "pairs": pairs},
    )
    out = Path(cfg.out)
    merged.replace(out)
    shutil.rmtree(work)
    return out
