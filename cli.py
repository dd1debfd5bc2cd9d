"""The `unode` command line: parses arguments, calls into node/, maps user errors to one line.

Thin on purpose: every command's work lives in node/ (or protocol/) where tests reach it.
Each command group below has its own section; keep them apart.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from node.errors import UserError

app = typer.Typer(
    name="unode",
    help="A peer-to-peer network for merging and fusing large language models.",
    epilog=(
        "Start here: `unode demo` (3 local nodes, the built-in experts, a merge, a search and "
        "a fusion round). On your own: `unode merge recipe.yml out/` merges local models from "
        "a mergekit recipe; `unode join --expert DIR --domain D` puts a model on the network; "
        "`unode experts` lists what peers host; `unode round merge|search|fuse` works with "
        "them; `unode dashboard` watches it all. Every command has --help; most have --json."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(err: UserError) -> None:
    """One line on stderr, exit code 2: the contract for every user-input error."""
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


# --- merge (node/merge) ---------------------------------------------------------------


@app.command("merge")
def merge_cmd(
    recipe: Annotated[Path, typer.Argument(help="A mergekit-style YAML recipe.")],
    out_dir: Annotated[Path, typer.Argument(help="Where the merged model goes (must not exist).")],
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
    shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB, 500MB.")] = "5GB",
) -> None:
    """Merge models as a mergekit recipe says (every mergekit method; streaming, sharded)."""
    import json
    import os

    # Large tensors on transparent huge pages: far fewer page faults (read before torch loads).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from node.merge.api import merge

    try:
        report = merge(
            recipe, out_dir, force=force, progress=not quiet, shard_bytes=_size(shard_size)
        )
    except UserError as err:
        fail(err)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    typer.echo(
        f"merged {report.tensors} tensors ({report.params / 1e6:.1f}M params) with "
        f"{report.method} in {report.seconds:.1f}s -> {report.out_dir}"
    )


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return max(1, int(float(t[: -len(unit)]) * mult))
    if t.isdigit():
        return int(t)
    raise UserError("--shard-size", text, "give a size such as 5GB or 500MB")


# --- demo ------------------------------------------------------------------------------


@app.command("demo")
def demo_cmd(
    home: Annotated[
        Path | None,
        typer.Option(help="Cache and work directory (default $UNODE_HOME or ~/.cache/unode)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
    quick: Annotated[
        bool, typer.Option(help="Tiny untrained toy experts instead of the zoo (seconds).")
    ] = False,
    plot: Annotated[
        Path | None, typer.Option(help="PNG plot path (default <home>/demo/demo.png).")
    ] = None,
) -> None:
    """Start 3 local nodes hosting the built-in experts; run a merge, a search and a fusion
    round through the network; print a per-domain table and write a PNG plot."""
    import json

    from node.demo import DemoConfig, run_demo
    from node.demo.table import Row, render

    try:
        result = run_demo(DemoConfig(home=home, quick=quick, plot=plot))
    except UserError as err:
        fail(err)
    except KeyboardInterrupt:
        typer.echo("demo: interrupted; every node stopped", err=True)
        raise typer.Exit(130) from None
    except RuntimeError as err:  # a round or a node failed: its own output says why
        typer.echo(f"demo: failed (every node stopped): {err}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    rows = [Row(r["model"], r["kind"], Path(r["path"]), r["scores"]) for r in result["rows"]]
    typer.echo(render(rows, tuple(result["domains"])))
    merge = result["rounds"]["merge"]
    typer.echo(f"merge round {merge['round_id'][:12]}: bit-identical to the local merge: "
               f"{result['merge_bit_identical']}")  # fmt: skip
    search = result["rounds"]["search"]
    typer.echo(f"search round: start {search['start_score']:.4f} -> best "
               f"{search['best_score']:.4f} bits per byte ({search['evaluated']} candidates)")  # fmt: skip
    typer.echo(f"plot: {result['plot']}   total {result['seconds']:.0f}s")


# --- keys (protocol identity) -----------------------------------------------------------

keys_app = typer.Typer(help="This node's Ed25519 identity (record signing key = libp2p peer id).")
app.add_typer(keys_app, name="keys")
KeysStateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="Where identity.key lives (default $UNODE_STATE_DIR or ~/.local/share/unode).",
    ),
]
KeysJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _key_path(state_dir: Path | None) -> Path:
    from protocol.identity import KEY_FILE_NAME, default_state_dir

    return (state_dir if state_dir is not None else default_state_dir()) / KEY_FILE_NAME


def _print_identity(identity: object, path: Path, created: bool, as_json: bool) -> None:
    import json

    from protocol.identity import Identity

    assert isinstance(identity, Identity)
    info = {
        "peer_id": identity.peer_id,
        "public_key": identity.public_key.hex(),
        "short_id": identity.short_id,
        "key_file": str(path),
        "created": created,
    }
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"{'created' if created else 'loaded'} {path}")
    typer.echo(f"peer id     {info['peer_id']}")
    typer.echo(f"public key  {info['public_key']}")
    typer.echo(f"short id    {info['short_id']}")


def _identity_user_error(err: Exception, path: Path) -> UserError:
    from protocol.errors import IdentityError

    if isinstance(err, IdentityError):
        return UserError("key file", err.path, err.fix, problem=err.problem)
    return UserError("--state-dir", str(path.parent), "choose a directory you can write", str(err))


@keys_app.command("init")
def keys_init_cmd(state_dir: KeysStateDir = None, as_json: KeysJson = False) -> None:
    """Create this node's key file (mode 0600); refuses to replace an existing one."""
    from protocol.errors import IdentityError
    from protocol.identity import Identity, save_identity

    path = _key_path(state_dir)
    identity = Identity.generate()
    try:
        if path.exists():
            raise UserError(
                "key file",
                str(path),
                "keep it (see `unode keys show`) or move it away first",
                "already exists",
            )
        save_identity(identity, path)
    except (IdentityError, OSError) as err:
        fail(_identity_user_error(err, path))
    except UserError as err:
        fail(err)
    _print_identity(identity, path, True, as_json)


@keys_app.command("show")
def keys_show_cmd(state_dir: KeysStateDir = None, as_json: KeysJson = False) -> None:
    """Print this node's peer id and public key (refuses a key file others can read)."""
    from protocol.errors import IdentityError
    from protocol.identity import load_identity

    path = _key_path(state_dir)
    try:
        identity = load_identity(path)
    except (IdentityError, OSError) as err:
        fail(_identity_user_error(err, path))
    _print_identity(identity, path, False, as_json)


# --- fusion (node/fusion) ---------------------------------------------------------------


@app.command("summarize")
def summarize_cmd(
    model: Annotated[Path, typer.Option(help="Source model directory (HF layout).")],
    corpus: Annotated[Path, typer.Option(help="Instruction–response jsonl or plain text.")],
    out: Annotated[Path, typer.Option(help="Summaries directory (new, or a run to resume).")],
    top_k: Annotated[int, typer.Option(help="Distribution entries kept per token.")] = 10,
    temperature: Annotated[
        float, typer.Option(help="Softmax temperature of the stored log-probs.")
    ] = 1.0,
    max_len: Annotated[int, typer.Option(help="Tokens per sequence (longer ones are cut).")] = 2048,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    shard_size: Annotated[
        int, typer.Option(help="Sequences per shard (the unit of resume).")
    ] = 256,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Store a model's per-token top-k distributions over a corpus (compact, resumable)."""
    from node.fusion.summaries import SummarySettings, summarize

    settings = SummarySettings(top_k, temperature, max_len, shard_size, batch_size)
    try:
        path = summarize(model, corpus, out, settings, progress=not quiet)
    except UserError as err:
        fail(err)
    typer.echo(f"summaries -> {path.parent}")


@app.command("fuse")
def fuse_cmd(
    out: Annotated[Path, typer.Option(help="Output model directory (must not exist).")],
    corpus: Annotated[Path, typer.Option(help="The corpus the summaries were made on.")],
    summaries: Annotated[list[Path], typer.Option(help="Summaries directory (repeat per source).")],
    target: Annotated[Path | None, typer.Option(help="Model to train (FuseLLM).")] = None,
    pivot: Annotated[Path | None, typer.Option(help="Pivot model (with --pairwise).")] = None,
    pairwise: Annotated[
        bool, typer.Option(help="FuseChat: one fusion per source, then SCE merge.")
    ] = False,
    fusion: Annotated[
        str, typer.Option(help="min_ce, avg_ce, min_ce_token or avg_ce_token.")
    ] = "min_ce",
    lam: Annotated[float, typer.Option(help="Weight of the CLM term; 1 - lam on fusion.")] = 0.9,
    epochs: int = 1,
    lr: float = 1e-5,
    batch_size: int = 4,
    grad_accum: int = 1,
    warmup: Annotated[int, typer.Option(help="Warm-up optimizer steps.")] = 10,
    max_steps: Annotated[int | None, typer.Option(help="Total steps (overrides --epochs).")] = None,
    stop_after: Annotated[
        int | None, typer.Option(help="Checkpoint and stop after N steps.")
    ] = None,
    max_len: int = 2048,
    response_only: Annotated[bool, typer.Option(help="Loss on response tokens only.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue from OUT.work's checkpoint.")] = False,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast.")] = False,
    vocab_map: Annotated[str, typer.Option(help="exact, mined or stats.")] = "mined",
    alignment: Annotated[str, typer.Option(help="auto (offsets, else DP) or dp.")] = "auto",
    save_every: int = 50,
    sce_topk: Annotated[float, typer.Option(help="SCE select_topk (with --pairwise).")] = 1.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a target on λ·CLM + (1−λ)·fusion of source distributions (FuseLLM / FuseChat)."""
    from node.fusion.pairwise import fuse_pairwise
    from node.fusion.train import FuseConfig, fuse

    model = pivot if pairwise else target
    flag = "--pivot" if pairwise else "--target"
    try:
        if model is None:
            raise UserError(flag, "missing", f"give {flag} DIR")
        cfg = FuseConfig(
            target=model, summaries=list(summaries), corpus=corpus, out=out, fusion=fusion,
            lam=lam, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
            warmup=warmup, max_steps=max_steps, stop_after=stop_after, response_only=response_only,
            resume=resume, bf16=bf16, max_len=max_len, save_every=save_every,
            vocab_map=vocab_map, alignment=alignment, progress=not quiet,
        )  # fmt: skip
        result = fuse_pairwise(cfg, sce_topk) if pairwise else fuse(cfg)
    except UserError as err:
        fail(err)
    if result is None:
        typer.echo(f"stopped after --stop-after steps; continue with --resume ({out}.work)")
    else:
        typer.echo(f"fused model -> {result}")


# --- network (node/network) -------------------------------------------------------------

NetName = Annotated[
    str | None,
    typer.Option("--network", help="Network name (DHT key namespace); env UNODE_NETWORK."),
]
InitialPeers = Annotated[
    list[str] | None,
    typer.Option(
        "--initial-peers", help="Multiaddr of a running node (repeatable); env UNODE_INITIAL_PEERS."
    ),
]
StateDir = Annotated[
    Path | None, typer.Option("--state-dir", help="Identity, manifest cache; env UNODE_STATE_DIR.")
]


def _net_config(network: str | None, peers: list[str] | None, **kw: object) -> object:
    from node.network.config import network_config

    return network_config(network, peers, **kw)  # type: ignore[arg-type]


def _network_logging(verbose: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:  # hivemind logs every connection attempt at INFO
        logging.getLogger("hivemind").setLevel(logging.WARNING)


@app.command("join")
def join_cmd(
    initial_peers: InitialPeers = None,
    host_maddr: Annotated[
        list[str] | None,
        typer.Option(
            "--host-maddr", help="Listen multiaddr (repeatable).", envvar="UNODE_HOST_MADDR"
        ),
    ] = None,
    announce_maddr: Annotated[
        list[str] | None,
        typer.Option(
            "--announce-maddr",
            help="Public multiaddr to announce.",
            envvar="UNODE_ANNOUNCE_MADDR",
        ),
    ] = None,
    network: NetName = None,
    state_dir: StateDir = None,
    expert: Annotated[
        list[Path] | None,
        typer.Option(
            "--expert", help="Model directory to host (repeatable).", envvar="UNODE_EXPERT"
        ),
    ] = None,
    domain: Annotated[
        list[str] | None,
        typer.Option("--domain", help="Domain of each --expert, in order.", envvar="UNODE_DOMAIN"),
    ] = None,
    ttl: Annotated[
        float,
        typer.Option(
            help="Seconds an announcement lives (refreshed at ttl/3).", envvar="UNODE_TTL"
        ),
    ] = 300.0,
    summary: Annotated[
        list[Path] | None,
        typer.Option(
            "--summary",
            help="Distribution-summary directory to serve (repeatable).",
            envvar="UNODE_SUMMARY",
        ),
    ] = None,
    allowlist: Annotated[
        Path | None,
        typer.Option(
            "--allowlist",
            help="Private network: file of trusted peer ids; env UNODE_ALLOWLIST.",
        ),
    ] = None,
    max_upload: Annotated[
        float | None,
        typer.Option(
            "--max-upload",
            metavar="MB_PER_S",
            help="Cap on what this node serves to peers, all streams together, in megabytes "
            "per second (e.g. 5 on a home uplink). Default: no cap.",
            envvar="UNODE_MAX_UPLOAD",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", envvar="UNODE_VERBOSE")] = False,
    metrics_port: MetricsPort = None,
    log_format: LogFormat = "text",
) -> None:
    """Join (or start) a network: host experts, serve their tensors, announce them; Ctrl+C stops."""
    from node.network.config import JoinConfig, check_summary_dir, hosted_experts
    from node.network.node import run_join

    _network_logging(verbose)
    try:
        _observability(metrics_port, log_format)  # see the dashboard section
        if not 30.0 <= ttl <= 86400.0:
            raise UserError("--ttl", ttl, "use 30 to 86400 seconds")
        net = _net_config(
            network,
            initial_peers,
            host_maddrs=host_maddr,
            announce_maddrs=announce_maddr,
            state_dir=state_dir,
            allowlist=allowlist,
        )
        if max_upload is not None and not 0.1 <= max_upload <= 100_000:
            raise UserError("--max-upload", max_upload, "use 0.1 to 100000 megabytes per second")
        summaries = tuple(check_summary_dir(p) for p in summary or [])
        upload = max_upload * 1e6 if max_upload is not None else None
        cfg = JoinConfig(net, hosted_experts(expert, domain), ttl, summaries, upload)  # type: ignore[arg-type]
        code = run_join(cfg)
    except UserError as err:
        fail(err)
    raise typer.Exit(code)


@app.command("fetch")
def fetch_cmd(
    expert_id: Annotated[str, typer.Argument(help="Expert id (hex, or a unique 8+ digit prefix).")],
    out_dir: Annotated[Path, typer.Argument(help="New directory to rebuild the expert in.")],
    initial_peers: InitialPeers = None,
    network: NetName = None,
    workers: Annotated[int, typer.Option(help="Concurrent transfer streams.")] = 4,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Rebuild an expert's directory from the network, every chunk verified; re-run to resume."""
    from node.network.commands import run_fetch
    from node.network.pool import FetchError

    _network_logging(verbose)
    bar = _ProgressLine()
    try:
        if not 1 <= workers <= 32:
            raise UserError("--workers", workers, "use 1 to 32")
        report = run_fetch(_net_config(network, initial_peers), expert_id, out_dir, workers, bar)  # type: ignore[arg-type]
    except UserError as err:
        fail(err)
    except FetchError as err:
        typer.echo(f"\nerror: fetch incomplete, re-run the same command to resume: {err}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("\ninterrupted: re-run the same command to resume", err=True)
        raise typer.Exit(130) from None
    bar.close()
    mbps = report.fetched_bytes / max(report.seconds, 1e-9) / 1e6
    typer.echo(
        f"fetched {report.expert_id.hex()} into {report.out_dir}: {report.total_bytes / 1e6:.1f} MB "
        f"({report.fetched_bytes / 1e6:.1f} MB transferred at {mbps:.0f} MB/s, "
        f"{report.reused_bytes / 1e6:.1f} MB resumed), all chunks verified"
    )
    for peer, why in report.dropped.items():
        typer.echo(f"dropped provider {peer}: {why}", err=True)


class _ProgressLine:
    """A one-line progress display on stderr (a terminal only)."""

    def __init__(self) -> None:
        self.last = -1

    def __call__(self, done: int, total: int) -> None:
        pct = int(100 * done / max(total, 1))
        if pct != self.last and sys.stderr.isatty():
            self.last = pct
            sys.stderr.write(f"\r{pct:3d}% of {total / 1e6:.1f} MB")
            sys.stderr.flush()

    def close(self) -> None:
        if self.last >= 0 and sys.stderr.isatty():
            sys.stderr.write("\n")


@app.command("peers")
def peers_cmd(
    initial_peers: InitialPeers = None,
    network: NetName = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List the live peers of the network (signed, verified peer records)."""
    import json
    import time

    from node.network.commands import run_peers

    _network_logging(False)
    try:
        peers = run_peers(_net_config(network, initial_peers))  # type: ignore[arg-type]
    except UserError as err:
        fail(err)
    if as_json:
        typer.echo(json.dumps([p.__dict__ for p in peers], indent=2))
        return
    for p in peers:
        state = f"{len(p.experts)} experts" if p.maddrs else "withdrawn"
        typer.echo(
            f"{p.peer_id}  {state:<12} {p.agent:<12} expires in {p.expires - time.time():4.0f}s  {' '.join(p.maddrs[:2])}"
        )


@app.command("experts")
def experts_cmd(
    initial_peers: InitialPeers = None,
    network: NetName = None,
    domain: Annotated[str | None, typer.Option(help="Only experts of this domain.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List the experts live peers serve (signed cards, verified)."""
    import json

    from node.network.commands import run_experts

    _network_logging(False)
    try:
        found = run_experts(_net_config(network, initial_peers), domain)  # type: ignore[arg-type]
    except UserError as err:
        fail(err)
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    for e in found:
        typer.echo(
            f"{e['expert_id']}  {','.join(e['domains']):<12} {e['architecture']:<20} "
            f"{e['n_params'] / 1e6:7.2f}M params  {len(e['providers'])} provider(s)  {e['name']}"
        )


# --- rounds (node/rounds) --------------------------------------------------------------

round_app = typer.Typer(
    help="Cooperative rounds: sharded merges, layer-wise CMA-ES search, knowledge fusion.",
    no_args_is_help=True,
)
app.add_typer(round_app, name="round")


def _round_check(flag: str, value: float, lo: float, hi: float) -> float:
    if not lo <= value <= hi:
        raise UserError(flag, value, f"use a value in [{lo:g}, {hi:g}]")
    return value


RoundKey = Annotated[
    Path | None,
    typer.Option(
        "--key",
        help="Sign the round with this key file (from `unode keys init --state-dir DIR`) instead "
        "of a fresh one; needed in allowlisted networks. Env UNODE_ROUND_KEY.",
    ),
]


def _round_net(network: str | None, peers: list[str] | None, key: Path | None) -> Any:
    import dataclasses

    return dataclasses.replace(_net_config(network, peers), key_file=key)  # type: ignore[type-var]


@round_app.command("merge")
def round_merge_cmd(
    recipe: Annotated[
        Path, typer.Argument(help="YAML recipe whose models are unode://<expert id>.")
    ],
    initial_peers: InitialPeers = None,
    network: NetName = None,
    units: Annotated[int, typer.Option(help="Work units (0: one per layer).")] = 0,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the round until the expert is announced.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait (for pickup, or with --wait).")
    ] = 600.0,
    claim_ttl: Annotated[
        float, typer.Option(help="Seconds a worker's claim on a unit lives.")
    ] = 60.0,
    verify_rate: Annotated[
        float, typer.Option(help="Share of others' units each worker recomputes.")
    ] = 0.25,
    name: Annotated[str, typer.Option(help="Name of the merged expert.")] = "merged",
    domain: Annotated[
        str, typer.Option(help="Domain the merged expert is announced under.")
    ] = "general",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    key: RoundKey = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Propose a merge round: nodes running `unode join` compute it unit by unit, verify each
    other and announce the merged expert (with its lineage)."""
    import json

    from node.network.config import check_domain
    from node.rounds.propose import MergeRoundConfig, load_round_recipe, run_merge_round

    _network_logging(verbose)
    try:
        cfg = MergeRoundConfig(
            load_round_recipe(recipe), units=int(_round_check("--units", units, 0, 1 << 20)),
            claim_ttl=_round_check("--claim-ttl", claim_ttl, 1, 3600),
            verify_rate=_round_check("--verify-rate", verify_rate, 0, 1),
            name=name, domain=check_domain(domain),
        )  # fmt: skip
        net = _round_net(network, initial_peers, key)
        out = run_merge_round(net, cfg, wait, timeout, typer.echo)
    except UserError as err:
        fail(err)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    elif out.get("expert_id"):
        typer.echo(f"merged expert: {out['expert_id']}")


# --- zoo (node/zoo) --------------------------------------------------------------------

zoo_app = typer.Typer(
    help="The built-in expert zoo (base, domain experts, heterogeneous experts).",
    no_args_is_help=True,
)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
def zoo_build_cmd(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Zoo directory (default: $UNODE_HOME/zoo or ~/.cache/unode/zoo)."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even if a complete zoo is there.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of every random choice in the build.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the zoo manifest as JSON.")
    ] = False,
) -> None:
    """Build the zoo offline and deterministically (about 10 minutes, single-threaded)."""
    import json

    from node.zoo import ZooConfig, build

    try:
        manifest = build(out, ZooConfig(seed=seed), force=force, progress=not (quiet or as_json))
    except UserError as err:
        fail(err)
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
        return
    root = Path(manifest["root"])
    for name, domains in manifest["experts"].items():
        typer.echo(f"{name:<14} llama  experts in {','.join(domains):<22} {root / name}")
    for name, arch in manifest["hetero"].items():
        typer.echo(f"{name:<14} {arch:<6} heterogeneous (own tokenizer)   {root / name}")
    typer.echo(f"{'base':<14} llama  base of the experts              {root / 'base'}")


# --- import (node/importer) -------------------------------------------------------------


@app.command("import")
def import_cmd(
    source: Annotated[
        str,
        typer.Argument(
            metavar="GGUF_OR_DIR",
            help="A .gguf file, a directory holding one, or pkg:smollm2 / pkg:gemma3-270m.",
        ),
    ],
    out_dir: Annotated[Path, typer.Argument(help="New Hugging Face model directory.")],
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Import a GGUF model (dequantized) as safetensors + config + tokenizer."""
    import json

    from node.importer.gguf_import import import_gguf
    from node.importer.packaged import packaged_gguf

    try:
        src = packaged_gguf(source[4:]) if source.startswith("pkg:") else Path(source)
        progress = None if quiet else _import_progress
        report = import_gguf(src, out_dir, dtype=dtype, force=force, progress=progress)
    except UserError as err:
        fail(err)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    typer.echo(
        f"imported {report.architecture} ({report.params / 1e6:.1f}M params, vocab "
        f"{report.vocab_size}, {report.dtype}) in {report.seconds:.1f}s -> {report.out_dir}"
    )


def _import_progress(msg: str) -> None:
    typer.echo(f"import: {msg}", err=True)


@round_app.command("search")
def round_search_cmd(
    recipe: Annotated[
        Path, typer.Argument(help="Starting recipe; models are unode://<expert id>.")
    ],
    initial_peers: InitialPeers = None,
    network: NetName = None,
    budget: Annotated[int, typer.Option(help="Candidates to evaluate in total.")] = 16,
    population: Annotated[int, typer.Option(help="CMA-ES population per generation.")] = 4,
    groups: Annotated[int, typer.Option(help="Layer groups (per module class) searched.")] = 2,
    sigma: Annotated[float, typer.Option(help="CMA-ES initial step size.")] = 0.15,
    scorers: Annotated[int, typer.Option(help="Peers that must score each candidate.")] = 1,
    score_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for a generation's scores.")
    ] = 300.0,
    merge_best: Annotated[
        bool, typer.Option("--merge/--no-merge", help="Run a merge round for the best recipe.")
    ] = True,
    guard: Annotated[
        bool,
        typer.Option(
            "--guard/--no-guard",
            help="Guard against over-fitting: peers score each candidate on half of their "
            "held-out texts (what CMA-ES sees) and on the other half; the recipe kept is the "
            "start or a generation's best, whichever is best on the held-back half.",
        ),
    ] = False,
    floor: Annotated[
        float,
        typer.Option(
            help="Keep every expert's domain: generation 0 also scores each expert alone, and a "
            "candidate keeping less than this share of the best expert's bits per byte on a "
            "peer's domain has its score raised by 4x the shortfall (e.g. 0.92; 0: off).",
        ),
    ] = 0.0,
    out: Annotated[Path | None, typer.Option(help="Write the best recipe (YAML) here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    key: RoundKey = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Evolutionary layer-wise search (CMA-ES): peers score candidate recipes on their own
    held-out data; the best recipe is merged in a round and announced as an expert."""
    import json

    import yaml

    from node.rounds.propose import MergeRoundConfig, load_round_recipe
    from node.rounds.search import SearchConfig, run_search

    _network_logging(verbose)
    try:
        rec = load_round_recipe(recipe)
        cfg = SearchConfig(
            rec, budget=int(_round_check("--budget", budget, 1, 10000)),
            population=int(_round_check("--population", population, 2, 1000)),
            groups=int(_round_check("--groups", groups, 1, 1000)), sigma=_round_check("--sigma", sigma, 1e-4, 10),
            scorers=int(_round_check("--scorers", scorers, 1, 1000)), score_timeout=score_timeout,
            merge=MergeRoundConfig(rec, name="searched") if merge_best else None, guard=guard,
            floor=_round_check("--floor", floor, 0, 1),
        )  # fmt: skip
        result = run_search(_round_net(network, initial_peers, key), cfg, typer.echo)
    except UserError as err:
        fail(err)
    if out is not None:
        out.write_text(yaml.safe_dump(result["best_recipe"], sort_keys=False))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        kept = ""
        if "guard" in result:
            g = result["guard"]
            which = "the start" if g["picked"] == "start" else f"generation {g['picked']}'s best"
            kept = f" (kept {which}: held back {g['best_heldback']:.4f}, start {g['start_heldback']:.4f})"
        typer.echo(
            f"start {result['start_score']:.4f} -> best {result['best_score']:.4f}{kept}; expert {result['expert_id']}"
        )


@round_app.command("fuse")
def round_fuse_cmd(
    target: Annotated[
        str, typer.Option(help="Expert id (or 8+ hex prefix) of the model to train.")
    ],
    sources: Annotated[list[str], typer.Option("--sources", help="Source expert id (repeatable).")],
    corpus: Annotated[Path, typer.Option(help="Instruction-response .jsonl corpus.")],
    initial_peers: InitialPeers = None,
    network: NetName = None,
    shards: Annotated[int, typer.Option(help="Corpus shards (units per source).")] = 2,
    max_steps: Annotated[int, typer.Option(help="Training steps of the target.")] = 20,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-4,
    lam: Annotated[float, typer.Option(help="Weight of the CLM term (1 - lam on fusion).")] = 0.9,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the round until the expert is announced.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 1800.0,
    verify_rate: Annotated[
        float,
        typer.Option(
            help="Share of others' units each host of the source (and the trainer) "
            "checks by recomputing a sample."
        ),
    ] = 0.25,
    name: Annotated[str, typer.Option(help="Name of the fused expert.")] = "fused",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    key: RoundKey = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Propose a fusion round: source hosts summarize corpus shards, the target's host fuses
    and trains, and the fused model is announced as a new expert."""
    import json

    from node.rounds.propose_fuse import FuseRoundConfig, run_fuse_round

    _network_logging(verbose)
    try:
        cfg = FuseRoundConfig(target, tuple(sources), corpus, int(_round_check("--shards", shards, 1, 4096)),
                              verify_rate=_round_check("--verify-rate", verify_rate, 0, 1), name=name)  # fmt: skip
        cfg.train.update(max_steps=int(_round_check("--max-steps", max_steps, 1, 10**7)),
                         lr=_round_check("--lr", lr, 0, 1), lam=_round_check("--lam", lam, 0, 1))  # fmt: skip
        net = _round_net(network, initial_peers, key)
        out = run_fuse_round(net, cfg, wait, timeout, typer.echo)
    except UserError as err:
        fail(err)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    elif out.get("expert_id"):
        typer.echo(f"fused expert: {out['expert_id']}")


# --- dashboard (node/dashboard, node/metrics) -------------------------------------------

MetricsPort = Annotated[
    int | None,
    typer.Option(
        "--metrics-port", help="Serve Prometheus metrics on this port (0: any free port).",
        envvar="UNODE_METRICS_PORT",
    ),
]  # fmt: skip
LogFormat = Annotated[
    str,
    typer.Option(
        "--log-format", help="Log lines on stderr: text or json.", envvar="UNODE_LOG_FORMAT"
    ),
]


def _observability(metrics_port: int | None, log_format: str) -> None:
    """`join --log-format json` and `--metrics-port` (raises UserError on bad values)."""
    from node.metrics.logs import LOG_FORMATS, use_json_logs
    from node.metrics.registry import start_metrics_server

    if log_format not in LOG_FORMATS:
        raise UserError("--log-format", log_format, "use text or json")
    if log_format == "json":
        use_json_logs()
    if metrics_port is None:
        return
    if not 0 <= metrics_port <= 65535:
        raise UserError("--metrics-port", metrics_port, "use a TCP port number 1-65535 (0: any)")
    try:
        port = start_metrics_server(metrics_port)
    except OSError as err:
        raise UserError(
            "--metrics-port", metrics_port, "pick a free port", problem=f"cannot listen ({err})"
        ) from None
    print(f"unode: metrics on http://0.0.0.0:{port}/metrics", flush=True)


@app.command("dashboard")
def dashboard_cmd(
    initial_peers: InitialPeers = None,
    network: NetName = None,
    refresh: Annotated[float, typer.Option("--refresh", help="Seconds between updates.")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one snapshot and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --once: JSON for scripts.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Live view of a network (peers, experts, rounds, search); every record verified; q quits."""
    from node.dashboard.app import print_once, run_live

    _network_logging(verbose)
    code = 0
    try:
        if not 0.2 <= refresh <= 3600.0:
            raise UserError("--refresh", refresh, "use 0.2 to 3600 seconds")
        if as_json and not once:
            raise UserError("--json", True, "add --once (the live view is not JSON)")
        net = _net_config(network, initial_peers)
        if once:
            print_once(net, as_json, refresh)  # type: ignore[arg-type]
        else:
            code = run_live(net, refresh)  # type: ignore[arg-type]
    except UserError as err:
        fail(err)
    raise typer.Exit(code)


# --- eval (node/eval) -------------------------------------------------------------------


@app.command("eval")
def eval_cmd(
    model: Annotated[Path, typer.Argument(help="A model directory (safetensors + tokenizer).")],
    domains: Annotated[
        str,
        typer.Option(
            help="Comma-separated: arithmetic,logic,python,prose; also arithlogic (the two-skill "
            "task) and arithmetic2,logic64 (two-digit sums, 64 expressions: for real models)."
        ),
    ] = "arithmetic,logic,python,prose",
    n: Annotated[int, typer.Option(help="Held-out examples per domain.")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Score a model per domain: bits per byte (lower is better) and exact-match accuracy.

    Bits per byte compare models with different tokenizers; exact match is measured on
    the reasoning domains (arithmetic, logic) by greedy generation.
    """
    import json

    from node.eval import metrics

    try:
        if not (model / "config.json").is_file():
            raise UserError("MODEL", str(model), "give a directory holding config.json", "no model")
        if n < 1:
            raise UserError("--n", n, "use a positive number of examples")
        scores = metrics.evaluate(model, [d.strip() for d in domains.split(",") if d.strip()], n)
    except UserError as err:
        fail(err)
    if as_json:
        typer.echo(json.dumps({"model": str(model), "scores": metrics.as_json(scores)}, indent=2))
        return
    typer.echo(f"{'domain':<12} {'bits/byte':>10} {'exact match':>12}")
    for s in scores:
        em = "-" if s.exact_match is None else f"{s.exact_match:.3f}"
        typer.echo(f"{s.domain:<12} {s.bits_per_byte:>10.4f} {em:>12}")


def main() -> None:
    try:
        app()
    except UserError as err:  # raised outside a command body (e.g. while parsing)
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
