"""Chunked object streams: boundaries, resume, and every way a sender can get a stream wrong."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from protocol.content import chunk_hash, tensor_hash
from protocol.errors import HashMismatchError, SizeError, StreamError
from protocol.records import TensorEntry, TensorManifest
from protocol.stream import (
    CHUNK_OVERHEAD,
    FrameSplitter,
    StreamDecoder,
    chunk_frame,
    decode_stream,
    encode_stream,
    length_prefixed,
    make_header,
)

CHUNK = 1024


@pytest.mark.parametrize("nbytes", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_blob_round_trip_at_chunk_boundaries(nbytes: int) -> None:
    data = os.urandom(nbytes)
    header = make_header(data, CHUNK)
    frames = list(encode_stream(data, header))
    assert len(frames) == 1 + -(-nbytes // CHUNK)
    assert [len(f) - CHUNK_OVERHEAD for f in frames[1:]] == [
        min(CHUNK, nbytes - i) for i in range(0, nbytes, CHUNK)
    ]
    assert decode_stream(frames, header.object_hash) == data


@pytest.mark.parametrize("n", [0, 1, CHUNK // 4 - 1, CHUNK // 4, CHUNK // 4 + 1])
def test_tensor_stream_into_preallocated_buffer(n: int) -> None:
    tensor = np.arange(n, dtype=np.float32) * 0.5
    expected = tensor_hash("F32", [n], tensor.tobytes(), CHUNK)
    header = make_header(tensor.tobytes(), CHUNK, "F32", [n])
    assert header.object_hash == expected
    out = np.empty(n, dtype=np.float32)
    decoder = StreamDecoder(expected, expected_meta=["tensor", "F32", [n]], out=out.data.cast("B"))
    for frame in encode_stream(tensor.tobytes(), header):
        decoder.feed(frame)
    decoder.finish()
    np.testing.assert_array_equal(out, tensor)


def test_resume_from_a_chunk() -> None:
    data = os.urandom(5 * CHUNK + 7)
    header = make_header(data, CHUNK)
    out = bytearray(len(data))
    first = StreamDecoder(header.object_hash, out=out)
    for frame in list(encode_stream(data, header))[:3]:  # header + chunks 0, 1, then the link drops
        first.feed(frame)
    with pytest.raises(StreamError, match="truncated at chunk 2/6"):
        first.finish()
    second = StreamDecoder(header.object_hash, out=out, resume_from=first.next_index)
    for frame in encode_stream(data, header, start=2):
        second.feed(frame)
    assert bytes(second.finish()) == data


def _frames(nbytes: int = 3 * CHUNK + 10) -> tuple[bytes, list[bytes], bytes]:
    data = os.urandom(nbytes)
    header = make_header(data, CHUNK)
    return data, list(encode_stream(data, header)), header.object_hash


def _feed_all(frames: list[bytes], expected: bytes, **kw: object) -> bytes:
    decoder = StreamDecoder(expected, **kw)  # type: ignore[arg-type]
    for frame in frames:
        decoder.feed(frame)
    return bytes(decoder.finish())


def test_rejects_reorder_truncation_extra_and_wrong_hash() -> None:
    data, frames, expected = _frames()
    flipped = bytearray(frames[2])
    flipped[-1] ^= 1
    short = frames[4][:-1]
    forged = chunk_frame(1, b"x" * CHUNK)  # self-consistent chunk, but not the promised one
    cases: dict[type[Exception], list[list[bytes]]] = {
        StreamError: [
            [frames[0], frames[2], frames[1], frames[3], frames[4]],  # reorder
            frames[:4],  # truncated
            [*frames, frames[4]],  # extra frame after the end
            [frames[0], frames[1], frames[1]],  # repeated chunk
            [frames[0], frames[1], frames[2], frames[3], short],  # short last chunk
            [frames[0], frames[1], frames[2], frames[3], frames[4] + b"!"],  # long last chunk
            frames[1:],  # no header
            [],
            [frames[0], b"\x02\x00"],  # malformed frame
        ],
        HashMismatchError: [
            [frames[0], frames[1], bytes(flipped), frames[3], frames[4]],
            [frames[0], frames[1], forged, frames[3], frames[4]],
        ],
    }
    for error, bad_streams in cases.items():
        for bad in bad_streams:
            with pytest.raises(error):
                _feed_all(bad, expected)
    assert _feed_all(frames, expected) == data


def test_rejects_a_header_for_another_object_or_meta() -> None:
    data, frames, expected = _frames()
    other = make_header(data[:-1], CHUNK)
    lying = dataclasses.replace(other, object_hash=expected)  # claims our hash, lists other chunks
    with pytest.raises(HashMismatchError):
        _feed_all([other.to_frame()], expected)
    with pytest.raises(HashMismatchError):
        _feed_all([lying.to_frame()], expected)
    with pytest.raises(HashMismatchError):
        _feed_all(frames, expected, expected_meta=["tensor", "U8", [len(data)]])
    with pytest.raises(SizeError):
        _feed_all(frames, expected, max_bytes=100)
    with pytest.raises(StreamError, match="starts at chunk 1"):
        _feed_all(list(encode_stream(data, make_header(data, CHUNK), start=1)), expected)
    with pytest.raises(StreamError, match="output buffer"):
        _feed_all(frames, expected, out=bytearray(10))
    assert chunk_hash(data[:CHUNK]) == frames[1][5:CHUNK_OVERHEAD]


def test_length_prefixed_byte_stream() -> None:
    data, frames, expected = _frames()
    wire = b"".join(length_prefixed(f) for f in frames)
    splitter = FrameSplitter()
    received = []
    for i in range(0, len(wire), 777):  # arbitrary transport read sizes
        received += splitter.feed(wire[i : i + 777])
    splitter.close()
    assert received == frames and decode_stream(received, expected) == data
    cut = FrameSplitter()
    cut.feed(wire[:-3])
    with pytest.raises(StreamError, match="inside a frame"):
        cut.close()
    with pytest.raises(SizeError):
        FrameSplitter(max_frame=100).feed(length_prefixed(frames[1]))


def test_real_safetensors_tensors_stream_into_torch_buffers(tmp_path: Path) -> None:
    """Manifest entries from a real safetensors file; each tensor streamed into torch memory."""
    import torch
    from safetensors.torch import save_file

    tensors = {
        "a.weight": torch.randn(3, 5),
        "b.bf16": torch.randn(7).to(torch.bfloat16),
        "c.index": torch.arange(4, dtype=torch.int64).reshape(2, 2),
        "d.empty": torch.zeros(0, 4, dtype=torch.float16),
        "e.big": torch.randn(600),  # 2400 bytes: 3 chunks
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    body = memoryview(raw)[8 + header_len :]
    entries = []
    for name in sorted(k for k in header if k != "__metadata__"):
        meta = header[name]
        begin, end = meta["data_offsets"]
        data = body[begin:end]
        digest = tensor_hash(meta["dtype"], meta["shape"], data, CHUNK)
        entries.append(TensorEntry(name, meta["dtype"], tuple(meta["shape"]), end - begin, digest))
    manifest = TensorManifest(CHUNK, tuple(entries), ())
    assert TensorManifest.from_verified_bytes(manifest.to_bytes(), manifest.hash()) == manifest
    assert {e.dtype for e in entries} == {"F32", "BF16", "I64", "F16"}
    for entry in manifest.tensors:
        begin, end = header[entry.name]["data_offsets"]
        sent = make_header(body[begin:end], CHUNK, entry.dtype, list(entry.shape))
        assert sent.object_hash == entry.hash
        original = tensors[entry.name]
        received = torch.empty_like(original)
        buffer = received.view(-1).view(torch.uint8).numpy()
        meta_list: list[object] = ["tensor", entry.dtype, list(entry.shape)]
        decoder = StreamDecoder(entry.hash, expected_meta=meta_list, out=buffer.data.cast("B"))
        for frame in encode_stream(body[begin:end], sent):
            decoder.feed(frame)
        decoder.finish()
        assert torch.equal(received, original), entry.name
