"""Transfer speed and peak memory of `unode fetch` against the raw p2pd stream and hivemind's
default protobuf streaming, side by side, between two nodes on loopback.

Builds a ~200 MB Llama-shaped fp32 expert in bench/_work (cached). Each round runs, for every
method, a fresh server process and a fresh client process:
  raw       a raw p2pd binary stream of the expert's file bytes, read and discarded (the ceiling)
  raw4      the same bytes over 4 parallel raw streams (unode fetches with 4 streams)
  protobuf  hivemind's default: serialize_torch_tensor + split_for_streaming (64 KiB parts),
            combine_from_streaming + deserialize_torch_tensor on the client
  unode     the real thing: a `unode join` server, the client runs fetch_expert (every chunk
            hash-checked against the signed manifest, written to disk)
Throughput = payload bytes / client transfer time; peak RSS = VmHWM summed over each side's
processes (python, DHT process, p2pd). Prints the best of the rounds and ratios.

    .venv/bin/python bench/transfer.py [--rounds 3] [--layers 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "_work" / "transfer"
UNODE = str(ROOT / ".venv" / "bin" / "unode")
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
METHODS = ("raw", "raw4", "protobuf", "unode")


def build_expert(layers: int) -> Path:
    from node import toymodels

    target = WORK / f"expert-h1024-l{layers}"
    if not (target / "config.json").is_file():
        shutil.rmtree(target, ignore_errors=True)
        toymodels.build_model(target, vocab_size=512, hidden=1024, layers=layers, seed=0)
    return target


def vmhwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mb(pid: int) -> dict[str, float]:
    """Peak RSS (VmHWM) of a process and everything below it, by command name."""
    from node.network.process import descendant_pids

    out: dict[str, float] = {}
    for p in [pid, *descendant_pids(pid)]:
        try:
            name = Path(f"/proc/{p}/comm").read_text().strip()
        except OSError:
            continue
        if name == "torch_shm_manag":
            continue
        key = name if name not in out else f"{name}-{p}"
        out[key] = vmhwm_kb(p) / 1024
    return out


# --- children ---------------------------------------------------------------------------


def child_serve(model_dir: Path) -> None:
    """raw + protobuf server on one p2pd; prints READY <maddr>; runs until SIGTERM."""
    import torch
    from hivemind.compression import serialize_torch_tensor
    from hivemind.proto import runtime_pb2
    from hivemind.utils.streaming import split_for_streaming
    from safetensors import safe_open

    from node.network.process import NodeDHT

    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    dht = NodeDHT(host_maddrs=[LOOPBACK], start=True)

    async def raw(info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Stream `k` of `n` parallel streams: every n-th MiB of the files, back to back."""
        k, n = (int(x) for x in (await reader.readexactly(2)))
        blocks = [(f, pos) for f in files for pos in range(0, f.stat().st_size, 1 << 20)][k::n]
        writer.write(
            sum(min(1 << 20, f.stat().st_size - pos) for f, pos in blocks).to_bytes(8, "big")
        )
        for f, pos in blocks:
            fd = os.open(f, os.O_RDONLY)
            writer.write(os.pread(fd, 1 << 20, pos))
            os.close(fd)
            await writer.drain()
        writer.close()

    async def pb(request: Any, context: Any) -> Any:
        for f in files:
            if f.suffix != ".safetensors":
                continue
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                    tensor: torch.Tensor = st.get_tensor(name)
                    for part in split_for_streaming(serialize_torch_tensor(tensor)):
                        yield part

    async def main() -> None:
        p2p = await dht.replicate_p2p()
        await p2p.add_binary_stream_handler("bench/raw", raw)
        await p2p.add_protobuf_handler("bench/pb", pb, runtime_pb2.ExpertUID, stream_output=True)
        print("READY", dht.get_visible_maddrs()[0], flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()

    try:
        asyncio.run(main())
    finally:
        dht.stop()


def child_get(method: str, maddr: str, out_dir: Path) -> None:
    """Run one transfer as a client; print a JSON line with bytes, seconds and peak RSS."""
    from hivemind.p2p import PeerID

    from node.network.process import NodeDHT

    peer = PeerID.from_base58(maddr.rsplit("/p2p/", 1)[1])
    if method == "unode":
        from node.network.session import run_async

        result = run_async(_get_unode(maddr, out_dir))
    else:
        dht = NodeDHT(host_maddrs=[LOOPBACK], initial_peers=[maddr], client_mode=True, start=True)
        try:
            if method.startswith("raw"):
                result = asyncio.run(_get_raw(dht, peer, 4 if method == "raw4" else 1))
            else:
                result = asyncio.run(_get_pb(dht, peer))
            result["rss_mb"] = tree_rss_mb(os.getpid())
        finally:
            dht.stop()
    print("RESULT", json.dumps(result), flush=True)


async def _get_raw(dht: Any, peer: Any, streams: int) -> dict[str, Any]:
    """The same bytes over `streams` parallel raw streams, read and discarded."""
    p2p = await dht.replicate_p2p()

    async def one(k: int) -> int:
        _, reader, writer = await p2p.call_binary_stream_handler(peer, "bench/raw")
        writer.write(bytes([k, streams]))
        total = left = int.from_bytes(await reader.readexactly(8), "big")
        while left:
            data = await reader.read(min(1 << 20, left))
            if not data:
                raise RuntimeError("raw stream ended early")
            left -= len(data)
        writer.close()
        return total

    t0 = time.perf_counter()
    total = sum(await asyncio.gather(*(one(k) for k in range(streams))))
    return {"bytes": total, "seconds": time.perf_counter() - t0}


async def _get_pb(dht: Any, peer: Any) -> dict[str, Any]:
    from hivemind.compression import deserialize_torch_tensor
    from hivemind.proto import runtime_pb2
    from hivemind.utils.streaming import combine_from_streaming

    p2p = await dht.replicate_p2p()
    t0 = time.perf_counter()
    total, want = 0, 0
    parts: list[Any] = []
    stream = await p2p.iterate_protobuf_handler(
        peer, "bench/pb", runtime_pb2.ExpertUID(uid="all"), runtime_pb2.Tensor
    )
    async for part in stream:
        if not parts:
            want = part.chunks
        parts.append(part)
        if len(parts) == want:
            tensor = deserialize_torch_tensor(combine_from_streaming(parts))
            total += tensor.numel() * tensor.element_size()
            parts = []
    return {"bytes": total, "seconds": time.perf_counter() - t0}


async def _get_unode(maddr: str, out_dir: Path) -> dict[str, Any]:
    from node.network.config import NetworkConfig
    from node.network.discovery import find_providers
    from node.network.fetch import fetch_expert
    from node.network.session import Session
    from protocol.validators import unode_validators

    net = NetworkConfig(network="bench", initial_peers=(maddr,), host_maddrs=(LOOPBACK,))
    session = Session(net, persistent=False, validators=unode_validators("bench"))
    session.start()
    try:
        for _ in range(20):
            providers = await find_providers(
                session.dht, "bench", bytes.fromhex(os.environ["BENCH_EXPERT"])
            )
            if providers:
                break
            await asyncio.sleep(0.5)
        p2p = await session.p2p()
        t0 = time.perf_counter()
        report = await fetch_expert(
            p2p, providers, bytes.fromhex(os.environ["BENCH_EXPERT"]), out_dir
        )
        seconds = time.perf_counter() - t0
        rss = tree_rss_mb(os.getpid())
        await session.close_p2p()
    finally:
        session.stop()
    return {"bytes": report.fetched_bytes, "seconds": seconds, "rss_mb": rss}


# --- parent ------------------------------------------------------------------------------


def _wait_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line.strip()
    raise RuntimeError(f"{proc.args!r} printed no {prefix} line")


def run_pair(method: str, model_dir: Path, expert_id: str) -> dict[str, Any]:
    tmp = WORK / "run"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if method == "unode":
        cmd = [
            UNODE,
            "join",
            "--network",
            "bench",
            "--host-maddr",
            LOOPBACK,
            "--state-dir",
            str(tmp / "state"),
            "--expert",
            str(model_dir),
            "--domain",
            "bench",
        ]
    else:
        cmd = [sys.executable, __file__, "--child", "serve", str(model_dir)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = _wait_line(server, "UNODE_READY" if method == "unode" else "READY")
        maddr = line.split("maddr=")[1] if method == "unode" else line.split()[1]
        client = subprocess.run(
            [sys.executable, __file__, "--child", "get", method, maddr, str(tmp / "out")],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "BENCH_EXPERT": expert_id},
        )
        lines = [x for x in client.stdout.splitlines() if x.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"client failed: {client.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(lines[0][7:])
        result["server_rss_mb"] = tree_rss_mb(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    if method == "unode":
        _check_identical(tmp / "out", model_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def _check_identical(got: Path, want: Path) -> None:
    for f in want.iterdir():
        if (got / f.name).stat().st_size != f.stat().st_size:
            raise RuntimeError(f"fetched {f.name} differs in size")
    import hashlib

    for f in want.iterdir():
        if (
            hashlib.sha256((got / f.name).read_bytes()).digest()
            != hashlib.sha256(f.read_bytes()).digest()
        ):
            raise RuntimeError(f"fetched {f.name} differs")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args()
    if args.child:
        if args.child[0] == "serve":
            child_serve(Path(args.child[1]))
        else:
            child_get(args.child[1], args.child[2], Path(args.child[3]))
        return
    from node.network.manifest import load_expert

    model_dir = build_expert(args.layers)
    expert_id = load_expert(model_dir, WORK / "cache").expert_id.hex()
    size = sum(f.stat().st_size for f in model_dir.iterdir())
    print(f"expert {expert_id[:16]}: {size / 1e6:.0f} MB in {model_dir}", flush=True)
    methods = tuple(args.methods.split(","))
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for r in range(args.rounds):
        order = methods if r % 2 == 0 else methods[::-1]
        for method in order:
            res = run_pair(method, model_dir, expert_id)
            results[method].append(res)
            mbps = res["bytes"] / res["seconds"] / 1e6
            print(
                f"round {r + 1} {method:<9} {res['bytes'] / 1e6:6.0f} MB in {res['seconds']:6.2f} s = {mbps:6.1f} MB/s  "
                f"client RSS {sum(res['rss_mb'].values()):6.0f} MB  server RSS {sum(res['server_rss_mb'].values()):6.0f} MB",
                flush=True,
            )
    report(results)


def fmt(rss: dict[str, float]) -> str:
    parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(rss.items()))
    return f"{sum(rss.values()):5.0f} ({parts})"


def report(results: dict[str, list[dict[str, Any]]]) -> None:
    best = {m: max(r["bytes"] / r["seconds"] / 1e6 for r in rs) for m, rs in results.items()}
    med = {
        m: statistics.median(r["bytes"] / r["seconds"] / 1e6 for r in rs)
        for m, rs in results.items()
    }
    raws = [m for m in ("raw", "raw4") if m in med]
    ceiling = max(raws, key=lambda m: med[m]) if raws else ""
    print(
        "\nmethod     best MB/s  median MB/s  peak RSS client (MB)            peak RSS server (MB)"
    )
    for m, rs in results.items():
        c = max(rs, key=lambda r: sum(r["rss_mb"].values()))["rss_mb"]
        s = max(rs, key=lambda r: sum(r["server_rss_mb"].values()))["server_rss_mb"]
        print(f"{m:<10} {best[m]:9.1f}  {med[m]:11.1f}  {fmt(c):<32} {fmt(s)}")
    if "unode" not in med:
        return
    print()
    for m, label in (
        ("raw", "raw stream (1 stream)"),
        ("raw4", "raw streams (4)"),
        ("protobuf", "hivemind protobuf"),
    ):
        if m in med:
            print(
                f"unode / {label:<22} best {best['unode'] / best[m]:.2f}   median {med['unode'] / med[m]:.2f}"
            )
    if ceiling:
        print(
            f"unode / ceiling ({ceiling}): median {med['unode'] / med[ceiling]:.2f}  (target >= 0.70)"
        )
    print(
        "(measured on a shared machine under load from other jobs: compare ratios, not absolutes)"
    )


if __name__ == "__main__":
    main()
