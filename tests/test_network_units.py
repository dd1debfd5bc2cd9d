"""Network pieces without p2pd: the blob server and client over a local socket, the wire
decoders on garbage, the rebuild plan on hostile shard headers, config and CLI errors."""

from __future__ import annotations

import asyncio
import os
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
from typer.testing import CliRunner

from cli import app
from node.errors import UserError
from node.network.client import BlobStream, FileTarget, MemoryTarget, ProviderError, ProviderLied
from node.network.config import hosted_experts, network_config
from node.network.manifest import load_expert
from node.network.plan import Journal, Piece, tensor_pieces
from node.network.ratelimit import TokenBucket
from node.network.service import BlobServer, frame_prefix
from protocol.content import record_hash
from protocol.errors import SchemaError
from protocol.records import TensorEntry, TensorManifest
from protocol.stream import chunk_frame, length_prefixed, make_header

CHUNK = 1024


@asynccontextmanager
async def served(server: BlobServer) -> AsyncIterator[Callable[[], Awaitable[BlobStream]]]:
    """The real server and client, over a unix socket instead of a libp2p stream."""
    path = tempfile.mktemp(suffix=".sock")
    info = SimpleNamespace(peer_id="peer-under-test")
    srv = await asyncio.start_unix_server(lambda r, w: server.handle(info, r, w), path=path)

    async def connect() -> BlobStream:
        reader, writer = await asyncio.open_unix_connection(path)
        return BlobStream("peer-under-test", reader, writer)

    try:
        yield connect
    finally:
        srv.close()
        os.unlink(path)


def host_blob(tmp_path: Path, data: bytes, corrupt: bool = False) -> tuple[BlobServer, Any]:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"PAD" + data)
    header = make_header(data, CHUNK)
    server = BlobServer(corrupt=corrupt)
    server.add_object(path, 3, header)
    return server, header


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_object_round_trip_at_chunk_boundaries(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    server, header = host_blob(tmp_path, data)
    out = bytearray(size)
    seen: list[int] = []

    async def run() -> None:
        async with served(server) as connect:
            stream = await connect()
            target = MemoryTarget(memoryview(out))
            await stream.get_object(
                header.object_hash, ["blob"], size, 0, target, lambda i, n: seen.append(i)
            )
            stream.close()

    asyncio.run(run())
    assert bytes(out) == data
    assert seen == list(range(1, len(header.chunks) + 1))


def test_resume_from_a_chunk_writes_only_the_rest(tmp_path: Path) -> None:
    data = os.urandom(4 * CHUNK)
    server, header = host_blob(tmp_path, data)
    out_path = tmp_path / "out.bin"
    out_path.write_bytes(data[: 2 * CHUNK] + bytes(2 * CHUNK))

    async def run() -> None:
        async with served(server) as connect:
            stream = await connect()
            fd = os.open(out_path, os.O_RDWR)
            try:
                await stream.get_object(
                    header.object_hash, ["blob"], len(data), 2, FileTarget(fd, 0), lambda i, n: None
                )
            finally:
                os.close(fd)
            stream.close()

    asyncio.run(run())
    assert out_path.read_bytes() == data
    assert server.served_bytes["peer-under-test"] == 2 * CHUNK


def test_altered_bytes_are_caught_as_a_lie(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK)
    server, header = host_blob(tmp_path, data, corrupt=True)
    out = bytearray(len(data))

    async def run() -> None:
        async with served(server) as connect:
            stream = await connect()
            await stream.get_object(
                header.object_hash,
                ["blob"],
                len(data),
                0,
                MemoryTarget(memoryview(out)),
                lambda i, n: None,
            )

    with pytest.raises(ProviderLied, match="does not match its hash"):
        asyncio.run(run())
    assert bytes(out) == bytes(len(data))  # nothing unverified was written


def test_wrong_object_meta_is_a_lie_and_unknown_hash_a_refusal(tmp_path: Path) -> None:
    data = os.urandom(CHUNK)
    server, header = host_blob(tmp_path, data)

    async def run(digest: bytes, meta: list[object]) -> None:
        async with served(server) as connect:
            stream = await connect()
            await stream.get_object(
                digest,
                meta,
                len(data),
                0,
                MemoryTarget(memoryview(bytearray(len(data)))),
                lambda i, n: None,
            )

    with pytest.raises(ProviderLied, match="another object"):
        asyncio.run(run(header.object_hash, ["tensor", "U8", [len(data)]]))
    with pytest.raises(ProviderError, match="unknown object"):
        asyncio.run(run(bytes(32), ["blob"]))


def test_record_is_checked_against_its_hash(tmp_path: Path) -> None:
    server = BlobServer()
    good = b"a manifest"
    server.add_record(record_hash(good), good)
    server.add_record(record_hash(b"other"), b"tampered")  # a server lying about a record

    async def run(digest: bytes) -> bytes:
        async with served(server) as connect:
            stream = await connect()
            return await stream.get_record(digest, 1 << 20)

    assert asyncio.run(run(record_hash(good))) == good
    with pytest.raises(ProviderLied):
        asyncio.run(run(record_hash(b"other")))


@pytest.mark.parametrize(
    "frame",
    [
        b"\x00\x00\x00\x03abc",  # not msgpack map
        length_prefixed(msgpack.packb({"op": "object", "hash": b"short", "start": 0})),
        length_prefixed(msgpack.packb({"op": "delete", "hash": bytes(32), "start": 0})),
        length_prefixed(msgpack.packb({"op": "object", "hash": bytes(32), "start": -1})),
        length_prefixed(msgpack.packb({"op": "object", "hash": bytes(32), "start": True})),
        b"\xff\xff\xff\xff",  # frame length over the cap
    ],
)
def test_server_survives_garbage_requests(tmp_path: Path, frame: bytes) -> None:
    server, header = host_blob(tmp_path, os.urandom(CHUNK))

    async def run() -> bytes:
        async with served(server) as connect:
            stream = await connect()
            stream._writer.write(frame)
            await stream._writer.drain()
            got: bytes = await asyncio.wait_for(stream._reader.read(), 5)
            # the server is still up and serves the next client
            ok = await connect()
            out = bytearray(CHUNK)
            await ok.get_object(
                header.object_hash,
                ["blob"],
                CHUNK,
                0,
                MemoryTarget(memoryview(out)),
                lambda i, n: None,
            )
            return got

    assert asyncio.run(run()) == b""  # it closed that stream without answering


def test_per_peer_stream_limit(tmp_path: Path) -> None:
    server, header = host_blob(tmp_path, os.urandom(CHUNK))
    server.limits.streams_per_peer = 1

    async def run() -> None:
        async with served(server) as connect:
            first = await connect()
            assert first is not None  # held open: the server counts it
            await asyncio.sleep(0.05)
            second = await connect()
            await second.get_object(
                header.object_hash,
                ["blob"],
                CHUNK,
                0,
                MemoryTarget(memoryview(bytearray(CHUNK))),
                lambda i, n: None,
            )

    with pytest.raises(ProviderError, match="busy"):
        asyncio.run(run())


def test_token_bucket_waits_exactly_what_the_rate_requires() -> None:
    clock, slept = [0.0], []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    async def run() -> None:
        bucket = TokenBucket(1000.0, burst=2000.0, clock=lambda: clock[0], sleep=sleep)
        await bucket.consume(2000)  # the burst: no wait
        assert slept == []
        await bucket.consume(500)  # 500 B at 1000 B/s
        await bucket.consume(3000)  # bigger than the burst: allowed, paid back by waiting
        assert slept == [0.5, 3.0]
        clock[0] += 10.0  # idle: refills to the burst, not beyond
        await bucket.consume(2000)
        await bucket.consume(1000)
        assert slept == [0.5, 3.0, 1.0]

    asyncio.run(run())
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_upload_cap_paces_every_served_chunk(tmp_path: Path) -> None:
    """The server with a cap: same bytes, and the waits add up to (bytes - burst) / rate."""
    data = os.urandom(6 * CHUNK)
    server, header = host_blob(tmp_path, data)
    server.limits.upload_bytes_per_s = 2 * CHUNK
    clock, slept = [0.0], []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    async def run() -> None:
        server._bucket = TokenBucket(2 * CHUNK, 2 * CHUNK, lambda: clock[0], sleep)
        async with served(server) as connect:
            stream = await connect()
            out = bytearray(len(data))
            target = MemoryTarget(memoryview(out))
            await stream.get_object(header.object_hash, ["blob"], len(data), 0, target,
                                    lambda i, n: None)  # fmt: skip
            stream.close()
        assert bytes(out) == data

    asyncio.run(run())
    assert len(slept) == 4 and sum(slept) == 2.0  # 6 chunks at 2 chunks/s, 2 chunks of burst
    assert server.served_bytes["peer-under-test"] == len(data)


def test_frame_prefix_is_protocol_chunk_framing() -> None:
    data, digest = os.urandom(777), os.urandom(32)
    assert frame_prefix(9, len(data), digest) + data == length_prefixed(
        chunk_frame(9, data, digest)
    )


def _manifest_and_header(
    tensors: dict[str, tuple[str, list[int], tuple[int, int]]],
) -> tuple[TensorManifest, bytes]:
    import json

    entries = tuple(
        TensorEntry(n, dt, tuple(shape), hi - lo, record_hash(n.encode()))
        for n, (dt, shape, (lo, hi)) in sorted(tensors.items())
    )
    header = json.dumps(
        {n: {"dtype": dt, "shape": s, "data_offsets": list(o)} for n, (dt, s, o) in tensors.items()}
    ).encode()
    return TensorManifest(CHUNK, entries, ()), struct.pack("<Q", len(header)) + header


def test_plan_places_tensors_from_a_valid_header() -> None:
    manifest, raw = _manifest_and_header(
        {"a": ("F32", [2, 2], (0, 16)), "b": ("F16", [3], (16, 22))}
    )
    pieces, sizes = tensor_pieces(manifest, {"model.safetensors": raw})
    assert sizes == {"model.safetensors": len(raw) + 22}
    assert sorted((p.file, p.offset, p.nbytes) for p in pieces) == [
        ("model.safetensors", len(raw), 16),
        ("model.safetensors", len(raw) + 16, 6),
    ]


@pytest.mark.parametrize(
    "tensors, header_override, problem",
    [
        ({"a": ("F32", [2], (0, 8)), "b": ("F32", [2], (12, 20))}, None, "gap or overlap"),
        ({"a": ("F32", [2], (0, 8)), "b": ("F32", [2], (4, 12))}, None, "gap or overlap"),
        (
            {"a": ("F32", [2], (0, 8))},
            {"zzz": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
            "not in the manifest",
        ),
        (
            {"a": ("F32", [2], (0, 8))},
            {"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 8]}},
            "disagrees",
        ),
        (
            {"a": ("F32", [2], (0, 8))},
            {"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}},
            "disagrees",
        ),
        (
            {"a": ("F32", [2], (0, 8))},
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, "8"]}},
            "two integers",
        ),
    ],
)
def test_plan_rejects_hostile_headers(tensors: Any, header_override: Any, problem: str) -> None:
    import json

    manifest, raw = _manifest_and_header(tensors)
    if header_override is not None:
        body = json.dumps({**json.loads(raw[8:]), **header_override}).encode()
        raw = struct.pack("<Q", len(body)) + body
    with pytest.raises(SchemaError, match=problem):
        tensor_pieces(manifest, {"model.safetensors": raw})


@pytest.mark.parametrize(
    "raw", [b"", b"\x01", struct.pack("<Q", 99) + b"{}", struct.pack("<Q", 2) + b"[]"]
)
def test_plan_rejects_malformed_header_entries(raw: bytes) -> None:
    manifest, _ = _manifest_and_header({"a": ("F32", [2], (0, 8))})
    with pytest.raises(SchemaError, match="header"):
        tensor_pieces(manifest, {"model.safetensors": raw})


def test_plan_rejects_a_tensor_no_header_places() -> None:
    manifest, _ = _manifest_and_header({"a": ("F32", [2], (0, 8)), "b": ("F32", [2], (8, 16))})
    _, raw = _manifest_and_header({"a": ("F32", [2], (0, 8))})
    with pytest.raises(SchemaError, match="no shard header places"):
        tensor_pieces(manifest, {"model.safetensors": raw})


def test_journal_keeps_the_furthest_progress_and_ignores_garbage(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    path.write_text(
        "model.safetensors@100\t3\ngarbage line\nmodel.safetensors@100\t7\n\tx\nconfig.json@0\t1"
    )
    j = Journal(path)
    piece = Piece(bytes(32), ["blob"], 10, "config.json", 0)
    j.record(piece, 2)
    j.close()
    assert Journal(path).progress == {"model.safetensors@100": 7, "config.json@0": 2}


def test_manifest_cache_follows_file_changes(tmp_path: Path, llama_family: Any) -> None:
    import shutil

    model = Path(shutil.copytree(llama_family.base, tmp_path / "m"))
    first = load_expert(model, tmp_path / "cache")
    assert load_expert(model, tmp_path / "cache").expert_id == first.expert_id
    cfg = model / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    changed = load_expert(model, tmp_path / "cache")
    assert changed.expert_id != first.expert_id
    assert {t.name for t in changed.manifest.tensors} == {t.name for t in first.manifest.tensors}
    assert [f.name for f in changed.manifest.files if f.name.endswith(".header")] == [
        "model.safetensors.header"
    ]


def test_config_errors_name_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNODE_INITIAL_PEERS", raising=False)
    with pytest.raises(UserError, match="--initial-peers"):
        network_config(None, ["/ip4/1.2.3.4/tcp/5"])  # no /p2p/ peer id
    with pytest.raises(UserError, match="--network"):
        network_config("Bad Name!", None)
    monkeypatch.setenv("UNODE_INITIAL_PEERS", "garbage")
    with pytest.raises(UserError, match="UNODE_INITIAL_PEERS"):
        network_config(None, None)
    with pytest.raises(UserError, match="one --domain per --expert"):
        hosted_experts([tmp_path], [])
    with pytest.raises(UserError, match="no safetensors"):
        hosted_experts([tmp_path], ["code"])


@pytest.mark.parametrize(
    "args, field",
    [
        (["join", "--initial-peers", "nonsense"], "--initial-peers"),
        (["join", "--expert", "/nonexistent", "--domain", "x"], "--expert"),
        (["join", "--ttl", "5"], "--ttl"),
        (["join", "--max-upload", "0"], "--max-upload"),
        (["fetch", "abc", "/nonexistent/unode-out"], "--initial-peers"),
        (["experts", "--network", "UPPER"], "--network"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(
    args: list[str], field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("UNODE_INITIAL_PEERS", raising=False)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0]


def test_fetch_refuses_a_non_empty_out_dir(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    peer = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWMnAaWjpHjEz1qVdEK9bHnRifLaCWRUTqJiC5ceh2mmmY"
    result = CliRunner().invoke(
        app, ["fetch", "ab" * 32, str(tmp_path / "out"), "--initial-peers", peer]
    )
    assert result.exit_code == 2 and "OUT_DIR" in result.output
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
