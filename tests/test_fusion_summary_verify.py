"""Spot checks of summaries by recomputation (node/fusion/summary_verify.py): honest summaries
match bit for bit on one machine and within the tolerance under float noise; plausible but
wrong summaries (they pass the content checks) are refused, each with what differed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from node.fusion.corpus import write_toy_corpus
from node.fusion.summaries import SummarySettings, batches_of, summarize, summarize_batch
from node.fusion.summary_check import SummaryMismatchError
from node.fusion.summary_store import FORMAT, SeqSummary, SummaryReader, file_sha256
from node.fusion.summary_verify import (
    LOGP_ATOL,
    compare_sequence,
    sample_batch,
    verify_sample,
)
from node.fusion.tokens import Encoded
from node.rounds import fuse_data

SETTINGS = SummarySettings(top_k=4, max_len=64, shard_size=6, batch_size=4)
Arrays = dict[str, np.ndarray]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_corpus(tmp_path_factory.mktemp("vcorpus") / "c.jsonl", n=10, seed=7)


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, llama_family: Any, corpus: Path) -> Path:
    """Honest summaries of the corpus by the base model, packed as a round unit."""
    tmp = tmp_path_factory.mktemp("vsumm")
    summarize(llama_family.base, corpus, tmp / "raw", SETTINGS, progress=False)
    fuse_data.pack(tmp / "raw", tmp / "unit")
    return tmp / "unit"


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def rewrite(d: Path, change: Callable[[Arrays], None]) -> Path:
    """Apply `change` to every shard of packed summaries `d`, updating the hashes."""
    mf = json.loads((d / "manifest.json").read_text())
    for entry in mf["shards"]:
        f = d / entry["file"]
        a = load_file(str(f))
        change(a)
        save_file(a, str(f), metadata={"format": FORMAT})
        entry["sha256"] = file_sha256(f)
    (d / "manifest.json").write_text(json.dumps(mf))
    return d


def test_batches_are_summarize_batches_and_the_sample_is_seeded() -> None:
    assert [(b.start, b.stop) for b in batches_of(10, SETTINGS)] == [(0, 4), (4, 6), (6, 10)]
    picks = {(b.start, b.stop) for b in (sample_batch(10, SETTINGS, bytes([i])) for i in range(40))}
    assert picks == {(0, 4), (4, 6), (6, 10)}  # every batch can be drawn
    assert sample_batch(10, SETTINGS, b"node-a") == sample_batch(10, SETTINGS, b"node-a")


def test_recomputation_is_bit_identical_on_one_machine(
    packed: Path, llama_family: Any, corpus: Path
) -> None:
    stored = SummaryReader(packed, verify=True)
    for batch in batches_of(10, SETTINGS):
        for i, (enc, rows) in summarize_batch(
            llama_family.base, corpus, batch, SETTINGS, 1
        ).items():
            got = stored.sequence(i)
            assert np.array_equal(got.ids, enc.ids)
            k = SETTINGS.top_k
            assert np.array_equal(got.topk_ids[:, :k], rows["topk_ids"][:, :k])
            assert np.array_equal(got.topk_logp, rows["topk_logp"][:, :k].astype(np.float16))
            assert np.array_equal(got.token_nll, rows["token_nll"].astype(np.float16))
            assert compare_sequence(got, enc, rows) == ""
        assert verify_sample(packed, llama_family.base, corpus, SETTINGS, b"seed") is not None


def test_float_noise_of_another_cpu_passes(packed: Path, llama_family: Any, corpus: Path) -> None:
    """Recomputed values moved by 1e-4 (above what float reordering does) still match."""
    rng = np.random.default_rng(0)
    stored = SummaryReader(packed, verify=False)
    for i, (enc, rows) in summarize_batch(llama_family.base, corpus, range(4), SETTINGS, 1).items():
        noisy = {k: v.copy() for k, v in rows.items()}
        noisy["topk_logp"] += rng.normal(0, 1e-4, noisy["topk_logp"].shape).astype(np.float32)
        noisy["token_nll"] += rng.normal(0, 1e-4, noisy["token_nll"].shape).astype(np.float32)
        assert compare_sequence(stored.sequence(i), enc, noisy) == ""


OTHER_KERNELS = """
import json
import sys
import numpy as np
import torch
from pathlib import Path
from node.fusion.summaries import SummarySettings, batches_of, summarize_batch
from node.fusion.summary_store import SummaryReader
from node.fusion.summary_verify import compare_sequence
torch.set_num_threads(1)
packed, model, corpus, out = map(Path, sys.argv[1:5])
s = SummarySettings(**json.loads(sys.argv[5]))
stored, logp = SummaryReader(packed, verify=False), []
for batch in batches_of(10, s):
    for i, (enc, rows) in summarize_batch(model, corpus, batch, s, 1).items():
        problem = compare_sequence(stored.sequence(i), enc, rows)
        assert problem == "", problem
        logp.append(rows["topk_logp"])
np.save(out, np.concatenate(logp))
"""


def test_a_verifier_with_another_cpus_kernels_accepts_honest_summaries(
    packed: Path, llama_family: Any, corpus: Path, tmp_path: Path
) -> None:
    """A verifier process whose GEMM and vector kernels are another x86 CPU's (MKL's SSE2
    compatible path, ATen without AVX2) gets other float32 values, and every sequence passes."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default"}
    out = tmp_path / "theirs.npy"
    args = [
        str(packed),
        str(llama_family.base),
        str(corpus),
        str(out),
        json.dumps(asdict(SETTINGS)),
    ]
    res = subprocess.run([sys.executable, "-c", OTHER_KERNELS, *args], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    ours = [
        rows["topk_logp"]
        for batch in batches_of(10, SETTINGS)
        for _, rows in summarize_batch(llama_family.base, corpus, batch, SETTINGS, 1).values()
    ]
    diff = np.abs(np.load(out, allow_pickle=False) - np.concatenate(ours))
    assert diff.max() > 0  # the kernels really differ: otherwise this test shows nothing
    assert diff.max() < LOGP_ATOL / 100


def _row(ids: list[int], logp: list[float]) -> SeqSummary:
    """A two-token sequence with one prediction row (top-k `ids`, `logp`)."""
    return SeqSummary(
        ids=np.array([1, 7]),
        spans=np.zeros((2, 2), dtype=np.int64),
        topk_ids=np.array([ids]),
        topk_logp=np.array([logp], dtype=np.float16).astype(np.float32),
        token_nll=np.array([1.0], dtype=np.float32),
        ce=1.0,
    )


def _ref(ids: list[int], logp: list[float]) -> tuple[Encoded, dict[str, np.ndarray]]:
    enc = Encoded(np.array([1, 7]), np.zeros((2, 2), dtype=np.int64))
    rows = {
        "topk_ids": np.array([ids]),
        "topk_logp": np.array([logp], dtype=np.float32),
        "token_nll": np.array([1.0], dtype=np.float32),
    }
    return enc, rows


def test_a_near_tie_at_rank_k_passes_and_a_clear_gap_does_not() -> None:
    # recomputed top-3 (plus the 4th): tokens 5 and 9 tie at the 3rd place to 1e-5
    enc, rows = _ref([3, 4, 5, 9], [-0.5, -1.2, -2.30000, -2.30001])
    # the peer's machine put token 9 third (noise of 1e-4), and ranks 1-2 in the other order
    assert compare_sequence(_row([4, 3, 9], [-1.2001, -0.4999, -2.2999]), enc, rows) == ""
    assert compare_sequence(_row([3, 4, 5], [-0.5, -1.2, -2.3]), enc, rows) == ""
    # the same swap where the 3rd place is clear (gap 0.5): token 5 must be there
    enc, rows = _ref([3, 4, 5, 9], [-0.5, -1.2, -2.3, -2.8])
    assert "token 9 has log-prob" in compare_sequence(
        _row([3, 4, 9], [-0.5, -1.2, -2.3]), enc, rows
    )
    # a token from outside the recomputed top-4, at a value no higher than the 4th: in a tie
    enc, rows = _ref([3, 4, 5, 9], [-0.5, -1.2, -2.3, -2.3])
    assert compare_sequence(_row([3, 4, 11], [-0.5, -1.2, -2.3]), enc, rows) == ""
    assert "token 11" in compare_sequence(_row([3, 4, 11], [-0.5, -1.2, -1.9]), enc, rows)
    # within the tolerance, not past it
    enc, rows = _ref([3, 4, 5, 9], [-0.5, -1.2, -2.3, -2.8])
    shift = LOGP_ATOL * 0.8
    assert compare_sequence(_row([3, 4, 5], [-0.5 - shift, -1.2, -2.3]), enc, rows) == ""
    assert "token 3" in compare_sequence(
        _row([3, 4, 5], [-0.5 - 3 * LOGP_ATOL, -1.2, -2.3]), enc, rows
    )


def _roll_ids(a: Arrays) -> None:
    a["topk_ids"] = np.roll(a["topk_ids"], 1, axis=1)  # log-probs stay sorted


def _shift_logp(a: Arrays) -> None:
    a["topk_logp"] = (a["topk_logp"].astype(np.float32) - 0.1).astype(np.float16)


def _shift_nll(a: Arrays) -> None:
    a["token_nll"] = (a["token_nll"].astype(np.float32) + 0.2).astype(np.float16)


def _swap_sequences(a: Arrays) -> None:
    a["seq_index"] = a["seq_index"][::-1].copy()  # each sequence labelled as another one


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "top-k ids rotated": (lambda d: rewrite(d, _roll_ids), "has log-prob"),
    "log-probs lowered by 0.1": (lambda d: rewrite(d, _shift_logp), "has log-prob"),
    "token NLLs raised by 0.2": (lambda d: rewrite(d, _shift_nll), "token NLL"),
    "sequences relabelled": (lambda d: rewrite(d, _swap_sequences), "token ids differ"),
    "rows shifted by one (the test fault)": (fuse_data.mislead, "has log-prob"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_plausible_corruption_passes_content_checks_but_not_recomputation(
    tmp_path: Path, packed: Path, llama_family: Any, corpus: Path, case: str
) -> None:
    corrupt, reason = CORRUPTIONS[case]
    bad = copy(packed, tmp_path / "bad")
    corrupt(bad)
    fuse_data.check_packed(bad)  # plausible: the content checks accept it
    for seed in (b"a", b"b", b"c"):  # whichever batch is sampled
        with pytest.raises(SummaryMismatchError, match=reason) as err:
            verify_sample(bad, llama_family.base, corpus, SETTINGS, seed)
        assert "sequence" in str(err.value)


def test_another_models_summaries_are_refused(
    tmp_path: Path, packed: Path, llama_family: Any, corpus: Path
) -> None:
    """A variant's summaries of the same corpus, relabelled as the base's: refused."""
    summarize(llama_family.variants[0], corpus, tmp_path / "raw", SETTINGS, progress=False)
    fuse_data.pack(tmp_path / "raw", tmp_path / "other")
    fuse_data.check_packed(tmp_path / "other")
    with pytest.raises(SummaryMismatchError, match=r"has log-prob|missing from the top-k"):
        verify_sample(tmp_path / "other", llama_family.base, corpus, SETTINGS, b"a")


def test_missing_sequences_are_refused(tmp_path: Path, llama_family: Any, corpus: Path) -> None:
    """Summaries of the first six sequences only (one shard of two), as a whole unit."""
    summarize(llama_family.base, corpus, tmp_path / "raw", SETTINGS, progress=False)
    fuse_data.pack(tmp_path / "raw", tmp_path / "unit")
    mf = json.loads((tmp_path / "unit" / "manifest.json").read_text())
    mf["shards"] = mf["shards"][:1]
    (tmp_path / "unit" / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(SummaryMismatchError, match="incomplete"):
        verify_sample(tmp_path / "unit", llama_family.base, corpus, SETTINGS, b"a")
