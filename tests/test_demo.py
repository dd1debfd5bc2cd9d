"""`unode demo --quick --json` through the CLI: three real `unode join` nodes on loopback run a
merge, a search and a fusion round; the table's values, the PNG and the cleanup are checked."""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNODE = str(ROOT / ".venv" / "bin" / "unode")


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries `tag` (every descendant of the demo inherits it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if tag.encode() in env and state != "Z":
            found.append(int(proc.name))
    return found


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB PNG; CRCs checked, all five filters."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert (depth, color) == (8, 2)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, rows, prev = zlib.decompress(idat), width * 3, [], bytes(width * 3)
    for y in range(height):
        f, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = line[i - 3] if i >= 3 else 0
            b, c = prev[i], prev[i - 3] if i >= 3 else 0
            p = a + b - c
            pred = [
                0,
                a,
                b,
                (a + b) // 2,
                min((a, b, c), key=lambda v: (abs(p - v), (a, b, c).index(v))),
            ][f]
            line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        prev = bytes(line)
    return width, height, rows


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("demo")
    tag = f"demo-test-{uuid.uuid4().hex}"
    res = subprocess.run(
        [UNODE, "demo", "--quick", "--json", "--home", str(tmp), "--plot", str(tmp / "p.png")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "UNODE_DEMO_TEST_TAG": tag},
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return {"out": json.loads(res.stdout), "stderr": res.stderr, "tag": tag, "tmp": tmp}


def rows_by_model(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["model"]: r for r in out["rows"]}


def test_demo_merge_round_is_bit_identical_and_plausible(quick_demo: dict[str, Any]) -> None:
    out = quick_demo["out"]
    assert out["models"] == "quick" and out["merge_bit_identical"] is True
    assert out["rounds"]["merge"]["bit_identical"] is True
    assert len(out["rounds"]["merge"]["expert_id"]) == 64
    rows = rows_by_model(out)
    assert [r["kind"] for r in out["rows"]].count("expert") == 2
    for domain in out["domains"]:
        for row in out["rows"]:
            s = row["scores"][domain]
            assert math.isfinite(s["bits_per_byte"]) and 0 < s["bits_per_byte"] < 20
            assert s["exact_match"] is None or 0.0 <= s["exact_match"] <= 1.0
        # the merge sits among its inputs: base + 0.5 * (sum of two small deltas)
        inputs = [
            rows[m]["scores"][domain]["bits_per_byte"] for m in ("base", "ft-prose", "ft-python")
        ]
        merged = rows["merge"]["scores"][domain]["bits_per_byte"]
        assert min(inputs) - 0.05 <= merged <= max(inputs) + 0.05
    assert rows["base"]["scores"]["arithmetic"]["exact_match"] is not None  # a task domain


def test_demo_search_and_fusion_rounds(quick_demo: dict[str, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    out = quick_demo["out"]
    search = out["rounds"]["search"]
    assert search["evaluated"] == 3 and search["best_score"] <= search["start_score"]
    assert search["guard_picked"] in ("start", 0)  # guarded: the start or generation 0's best
    floor = search["floor"]  # each searched expert alone was scored as the floor's reference
    assert floor["floor"] == 0.92 and len(floor["references"]) == 2
    searched = [m["model"] for m in search["best_recipe"]["models"]]
    assert sorted(r["model"] for r in floor["references"]) == sorted(searched)
    assert all(0 < r["score"] < 20 for r in floor["references"])
    weights = search["best_recipe"]["models"][0]["parameters"]["weight"]
    assert [w.get("filter") for w in weights] == ["self_attn", "mlp", None]
    assert len(weights[0]["value"]["layers"]) == 4
    fused_dir = Path(out["rounds"]["fusion"]["expert_dir"])
    fused = AutoModelForCausalLM.from_pretrained(fused_dir, dtype=torch.float32)
    target_row = next(r for r in out["rows"] if r["kind"] == "fusion target")
    target = AutoModelForCausalLM.from_pretrained(target_row["path"], dtype=torch.float32)
    name = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(fused.state_dict()[name], target.state_dict()[name])  # it trained
    fused_row = rows_by_model(out)["fused"]
    assert fused_row["scores"] != target_row["scores"]


def test_demo_plot_decodes_and_no_child_survives(quick_demo: dict[str, Any]) -> None:
    png = Path(quick_demo["out"]["plot"])
    assert png == quick_demo["tmp"] / "p.png"
    width, height, rows = decode_png(png.read_bytes())
    assert (width, height) == (960, 420) and len(rows) == 420
    colors = {row[i : i + 3] for row in rows[::7] for i in range(0, width * 3, 21)}
    assert len(colors) >= 6  # background, axes, text and one color per bar series
    assert b"\xff\xff\xff" in colors
    assert tagged_pids(quick_demo["tag"]) == []  # no p2pd, DHT or node process left
    assert "demo: stopping every node" in quick_demo["stderr"]
    assert "bit-identical to local merge: True" in quick_demo["stderr"]


def test_demo_home_that_is_a_file_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "file"
    home.write_text("x")
    res = subprocess.run(
        [UNODE, "demo", "--quick", "--home", str(home)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2 and "--home" in res.stderr
    assert home.read_text() == "x" and sorted(tmp_path.iterdir()) == [home]


@pytest.mark.slow
def test_demo_ctrl_c_stops_every_child(tmp_path: Path) -> None:
    tag = f"demo-test-{uuid.uuid4().hex}"
    proc = subprocess.Popen(
        [UNODE, "demo", "--quick", "--home", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "UNODE_DEMO_TEST_TAG": tag},
    )
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # wait until the nodes run and a round is under way
            seen.append(line)
            if "merge round:" in line:
                break
        assert len(tagged_pids(tag)) >= 9, "".join(seen)  # 3 nodes, each with a DHT and p2pd
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; every node stopped" in err
    assert tagged_pids(tag) == []
