"""The demo's PNG: per-layer coefficients of the searched recipe and per-domain bits per byte
of every model, drawn with numpy (rectangles and a 3x5 pixel font) and written with zlib."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from node.demo.table import Row

W, H = 960, 420
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip
# 3x5 glyphs, rows top to bottom, "1" = ink
FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "111100100100111", "D": "110101101101110", "E": "111100110100111",
    "F": "111100110100100", "G": "111100101101111", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101111", "K": "101101110101101",
    "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "111101101101111", "P": "111101111100100", "Q": "111101101111001",
    "R": "110101110101101", "S": "111100111001111", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101",
    "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    ".": "000000000000010", "-": "000000111000000", ":": "000010000010000",
    "/": "001001010100100", "(": "010100100100010", ")": "010001001001010",
    "_": "000000000000111", "%": "101001010100101", "=": "000111000111000", "+": "000010111010000",
}  # fmt: skip


def png_bytes(img: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 array as an 8-bit RGB PNG."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    head = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", head)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


class Canvas:
    def __init__(self, w: int, h: int) -> None:
        self.img = np.full((h, w, 3), 255, dtype=np.uint8)  # (H, W, RGB)

    def rect(self, x0: float, y0: float, x1: float, y1: float, rgb: tuple[int, int, int]) -> None:
        h, w, _ = self.img.shape
        xa, xb = sorted((round(x0), round(x1)))
        ya, yb = sorted((round(y0), round(y1)))
        self.img[max(ya, 0) : min(max(yb, ya + 1), h), max(xa, 0) : min(max(xb, xa + 1), w)] = rgb

    def text(
        self, x: int, y: int, s: str, scale: int = 2, rgb: tuple[int, int, int] = (0, 0, 0)
    ) -> None:
        for i, ch in enumerate(s.upper()):
            bits = FONT.get(ch, "000000000000000")
            for k, b in enumerate(bits):
                if b == "1":
                    cx, cy = x + (i * 4 + k % 3) * scale, y + (k // 3) * scale
                    self.rect(cx, cy, cx + scale, cy + scale, rgb)


def coefficient_series(
    recipe: dict[str, Any], names: list[str] | None = None
) -> list[tuple[str, list[float]]]:
    """(label, per-layer values) for each model's layer-wise weight tables in a recipe."""
    out = []
    for i, m in enumerate(recipe.get("models", [])):
        weight = (m.get("parameters") or {}).get("weight")
        if not isinstance(weight, list):
            continue
        for entry in weight:
            value = entry.get("value")
            if isinstance(value, dict) and "layers" in value:
                out.append(
                    (
                        f"{names[i] if names and i < len(names) else i + 1} {entry.get('filter', '')}",
                        [float(v) for v in value["layers"]],
                    )
                )
    return out


def _axes(c: Canvas, box: tuple[int, int, int, int], lo: float, hi: float, title: str) -> None:
    x0, y0, x1, y1 = box
    c.text(x0, y0 - 30, title)
    c.rect(x0, y1, x1, y1 + 1, (0, 0, 0))
    c.rect(x0, y0, x0 + 1, y1, (0, 0, 0))
    for v in (lo, (lo + hi) / 2, hi):
        y = y1 - (v - lo) / (hi - lo) * (y1 - y0)
        c.rect(x0 - 4, y, x0, y + 1, (0, 0, 0))
        c.text(x0 - 44, int(y) - 4, f"{v:.2f}", 1)


def bars(
    c: Canvas,
    box: tuple[int, int, int, int],
    groups: list[str],
    series: list[tuple[str, list[float]]],
    title: str,
) -> None:
    """Grouped bars: one group per x label, one colored bar per series; legend below."""
    x0, y0, x1, y1 = box
    vals = [v for _, vs in series for v in vs if math.isfinite(v)] or [0.0]
    lo, hi = min(0.0, min(vals) * 1.05), max(0.0, max(vals) * 1.05)
    hi = hi if hi > lo else lo + 1.0
    _axes(c, box, lo, hi, title)
    gw = (x1 - x0) / max(len(groups), 1)
    bw = gw * 0.8 / max(len(series), 1)
    zero = y1 - (0 - lo) / (hi - lo) * (y1 - y0)
    c.rect(x0, zero, x1, zero + 1, (96, 96, 96))
    for g, label in enumerate(groups):
        c.text(int(x0 + g * gw + gw * 0.1), y1 + 6, label[:12], 1)
        for s, (_, vs) in enumerate(series):
            v = vs[g] if g < len(vs) and math.isfinite(vs[g]) else 0.0
            bx = x0 + g * gw + gw * 0.1 + s * bw
            c.rect(bx, zero, bx + bw - 1, y1 - (v - lo) / (hi - lo) * (y1 - y0), PALETTE[s % 10])
    for s, (name, _) in enumerate(series):
        lx, ly = x0 + (s % 3) * ((x1 - x0) // 3), y1 + 22 + (s // 3) * 12
        c.rect(lx, ly, lx + 8, ly + 8, PALETTE[s % 10])
        c.text(lx + 12, ly + 1, name[:24], 1)


def write_demo_plot(
    path: Path,
    recipe: dict[str, Any],
    rows: list[Row],
    domains: tuple[str, ...],
    names: list[str] | None = None,
) -> Path:
    """Left: searched per-layer weights; right: bits per byte per domain (lower is better)."""
    c = Canvas(W, H)
    coeff = coefficient_series(recipe, names)  # names: the recipe's models, in order
    n_layers = max((len(v) for _, v in coeff), default=0)
    bars(
        c,
        (60, 50, 440, 300),
        [f"L{i}" for i in range(n_layers)],
        coeff,
        "searched weight per layer",
    )
    base = rows[0]
    scores = [(r.model, [100 * (_bpb(r, d) / _bpb(base, d) - 1) for d in domains]) for r in rows]
    title = f"bits per byte vs {base.model} (%, lower is better)"
    bars(c, (540, 50, 940, 300), list(domains), scores, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(png_bytes(c.img))
    tmp.replace(path)
    return path


def _bpb(row: Row, domain: str) -> float:
    v = row.scores[domain]["bits_per_byte"]
    return float(v) if v is not None else math.nan
