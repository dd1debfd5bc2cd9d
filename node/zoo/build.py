"""`build(out)`: the built-in zoo, deterministically: a shared tokenizer, a Llama-shaped base
pretrained on a mix of every domain, homogeneous experts fine-tuned gently from it (low LR,
L2-SP pull toward the base, a little replay of the mix), and heterogeneous experts (another
architecture and tokenizer) for fusion. Written to a temporary directory, then renamed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from node import toymodels
from node.errors import UserError
from node.zoo.tokenizer import tokenizer_corpus, train_zoo_tokenizer
from node.zoo.train import TrainConfig, train

MANIFEST = "zoo.json"
# the base sees every format, but too few task examples to learn the skills (the experts do)
BASE_MIX = {"arithmetic": 0.3, "logic": 0.3, "python": 1.0, "prose": 1.0, "arithlogic": 0.3}


@dataclass(frozen=True)
class ExpertSpec:
    """A homogeneous expert: fine-tuned from the base on `mix` (domain -> share; a key
    `arithlogic:arith` is the two-skill task with only that half's answer as a target).
    """

    name: str
    mix: Mapping[str, float]
    steps: int = 0  # 0: the config's `expert_steps`
    lr: float = 0.0  # 0: the config's `expert_lr`
    anchor_l2: float = -1.0  # < 0: the config's `anchor_l2`
    skill: str = ""  # its half of the two-skill prompt: "arith", "logic" or "" (neither)
    anchor_hidden: float = -1.0  # < 0: the config's `anchor_hidden`

    @property
    def domains(self) -> list[str]:
        return sorted(d for d in self.mix if ":" not in d)


@dataclass(frozen=True)
class HeteroSpec:
    """A heterogeneous expert: its own architecture and tokenizer, trained from scratch."""

    name: str
    arch: toymodels.Arch
    tokenizer_kind: str
    vocab_size: int
    hidden: int
    layers: int
    steps: int
    lr: float = 3e-3


EXPERTS = (
    ExpertSpec("arith", {"arithmetic": 0.4, "arithlogic:arith": 0.6}, skill="arith"),
    ExpertSpec("code", {"logic": 0.3, "python": 0.2, "arithlogic:logic": 0.5}, skill="logic"),
    # prose needs no new skill: gentle tuning keeps the task formats (lr 3e-3 breaks them)
    ExpertSpec("prose", {"prose": 1.0}, steps=150, lr=1e-3, anchor_l2=0.01),
)
HETERO = (HeteroSpec("gpt2-unigram", "gpt2", "unigram", 768, 96, 3, 300),)


@dataclass(frozen=True)
class ZooConfig:
    """Every knob of the zoo; its hash names a build (a changed knob means a rebuild)."""

    seed: int = 0
    vocab_size: int = 1024
    hidden: int = 128
    layers: int = 4
    base_steps: int = 500
    base_lr: float = 3e-3
    expert_steps: int = 800
    expert_lr: float = 3e-3
    anchor_l2: float = 0.001  # L2-SP strength toward the base during fine-tuning
    anchor_hidden: float = 1.0  # keep the base's hidden states off the expert's own data
    anchor_foreign: float = 1.0  # relative weight of other domains' positions in that anchor
    anchor_output: float = 0.0  # KL to the base's next-token distributions at those positions
    anchor_prior: float = 1.0  # experts keep the base's guess of a text's domain (first token)
    replay: float = 0.2  # share of expert batches drawn from the base mix
    tokens_per_batch: int = 1024
    examples_per_domain: int = 6000  # train-split texts drawn per domain
    tokenizer_texts: int = 600  # per domain, for training the tokenizers
    experts: tuple[ExpertSpec, ...] = EXPERTS
    hetero: tuple[HeteroSpec, ...] = HETERO
    threads: int = 1  # fixed: results do not depend on the machine's core count
    extra: dict[str, Any] = field(default_factory=dict)

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def base_sha256(self) -> str:
        """Hash of the knobs the tokenizer and base depend on (expert knobs reuse the base)."""
        keys = ("seed", "vocab_size", "hidden", "layers", "base_steps", "base_lr",
                "tokens_per_batch", "examples_per_domain", "tokenizer_texts", "threads")  # fmt: skip
        mine = {k: v for k, v in asdict(self).items() if k in keys} | {"mix": BASE_MIX}
        return hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()


def default_dir() -> Path:
    home = os.environ.get("UNODE_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "unode") / "zoo"


def expert_mix(spec: ExpertSpec, replay: float) -> dict[str, float]:
    """The expert's own domains, plus `replay` of the base mix (keeps experts near one basin)."""
    mix = {d: w * (1 - replay) / sum(spec.mix.values()) for d, w in spec.mix.items()}
    for d, w in BASE_MIX.items():
        mix[d] = mix.get(d, 0.0) + replay * w / sum(BASE_MIX.values())
    return mix


def _save(model: Any, tokenizer: Any, out: Path, card: dict[str, Any]) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "zoo_card.json").write_text(json.dumps(card, indent=2, sort_keys=True))


def _train_cfg(cfg: ZooConfig, label: str, mix: Mapping[str, float], **kw: Any) -> TrainConfig:
    return TrainConfig(
        mix=dict(mix), seed=cfg.seed, tokens_per_batch=cfg.tokens_per_batch, label=label,
        examples_per_domain=cfg.examples_per_domain, **kw
    )  # fmt: skip


def _fresh(arch: toymodels.Arch, vocab: int, hidden: int, layers: int, seed: int) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = toymodels.tiny_config(arch, vocab, hidden, layers)
    return AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]


Log = Callable[[str], None]


def _base(
    cfg: ZooConfig, tmp: Path, texts: list[str], old: Path | None, log: Log, bar: bool
) -> tuple[Any, Any]:
    """The tokenizer and base: copied from the previous zoo when its base knobs match."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if old is not None:
        log("base: reused from the previous build (same base knobs)")
        shutil.copytree(old, tmp / "base")
        tok = AutoTokenizer.from_pretrained(tmp / "base")
        return tok, AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32)
    tok = train_zoo_tokenizer(texts, cfg.vocab_size, "bpe")
    base = _fresh("llama", len(tok), cfg.hidden, cfg.layers, cfg.seed)
    log(f"base: {cfg.base_steps} steps on the mix")
    train(base, tok, _train_cfg(cfg, "base", BASE_MIX, steps=cfg.base_steps, lr=cfg.base_lr,
                                warmup=50), bar)  # fmt: skip
    card = {"name": "base", "role": "base", "mix": BASE_MIX, "base_sha256": cfg.base_sha256()}
    _save(base, tok, tmp / "base", card)
    return tok, base


def _build_homogeneous(
    cfg: ZooConfig, tmp: Path, texts: list[str], old: Path | None, log: Log, bar: bool
) -> None:
    tok, base = _base(cfg, tmp, texts, old, log, bar)
    for spec in cfg.experts:
        steps = spec.steps or cfg.expert_steps
        log(f"expert {spec.name}: {steps} steps on {sorted(spec.mix)}")
        model = copy.deepcopy(base)
        mix = expert_mix(spec, cfg.replay)
        l2 = cfg.anchor_l2 if spec.anchor_l2 < 0 else spec.anchor_l2
        hidden = cfg.anchor_hidden if spec.anchor_hidden < 0 else spec.anchor_hidden
        tcfg = _train_cfg(cfg, spec.name, mix, steps=steps, lr=spec.lr or cfg.expert_lr,
                          warmup=10, anchor_l2=l2, anchor_hidden=hidden,
                          anchor_foreign=cfg.anchor_foreign, anchor_output=cfg.anchor_output,
                          anchor_prior=cfg.anchor_prior, own=tuple(spec.domains),
                          skill=spec.skill)  # fmt: skip
        train(model, tok, tcfg, bar)
        card = {"name": spec.name, "role": "expert", "domains": spec.domains, "mix": mix}
        _save(model, tok, tmp / spec.name, card)


def _build_hetero(cfg: ZooConfig, tmp: Path, texts: list[str], log: Log, bar: bool) -> None:
    for spec in cfg.hetero:
        log(f"hetero {spec.name}: {spec.arch}, {spec.tokenizer_kind} tokenizer, {spec.steps} steps")
        tok = train_zoo_tokenizer(texts, spec.vocab_size, spec.tokenizer_kind)  # type: ignore[arg-type]
        model = _fresh(spec.arch, len(tok), spec.hidden, spec.layers, cfg.seed + 1)
        tcfg = _train_cfg(cfg, spec.name, BASE_MIX, steps=spec.steps, lr=spec.lr, warmup=30)
        train(model, tok, tcfg, bar)
        card = {"name": spec.name, "role": "hetero", "arch": spec.arch, "mix": BASE_MIX}
        _save(model, tok, tmp / spec.name, card)


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.safetensors"))
    }


def _reusable_base(out: Path, cfg: ZooConfig) -> Path | None:
    card = out / "base" / "zoo_card.json"
    if load_manifest(out) is None or not card.is_file():
        return None
    same = json.loads(card.read_text()).get("base_sha256") == cfg.base_sha256()
    return out / "base" if same else None


def load_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of a complete zoo at `out`, or None."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    return {**json.loads(path.read_text()), "root": str(Path(out).resolve())}


def build(
    out: Path | None = None,
    config: ZooConfig | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    log: Log | None = None,
) -> dict[str, Any]:
    """Build the zoo into `out` (default: `default_dir()`); returns its manifest.

    A complete zoo built with the same config is reused unless `force`.
    """
    cfg, out = config or ZooConfig(), Path(out) if out is not None else default_dir()
    say = log or (lambda msg: print(f"zoo: {msg}", flush=True) if progress else None)
    done = load_manifest(out)
    if done is not None and done.get("config_sha256") == cfg.sha256() and not force:
        return done
    if done is None and out.exists() and not force and any(out.iterdir()):
        raise UserError("--out", str(out), "pass --force to rebuild, or choose a new path",
                        "holds something that is not this zoo")  # fmt: skip
    tmp = out.parent / f".{out.name}.unode-tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    start = time.perf_counter()
    try:
        torch.set_num_threads(cfg.threads)
        torch.use_deterministic_algorithms(True)
        say("training the shared tokenizer")
        texts = tokenizer_corpus(cfg.tokenizer_texts)
        old = None if force else _reusable_base(out, cfg)
        _build_homogeneous(cfg, tmp, texts, old, say, progress)
        _build_hetero(cfg, tmp, texts, say, progress)
        manifest = _manifest(cfg, tmp, time.perf_counter() - start)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"built in {manifest['seconds']:.0f}s -> {out}")
    return {**manifest, "root": str(out.resolve())}


def _manifest(cfg: ZooConfig, root: Path, seconds: float) -> dict[str, Any]:
    return {
        "config_sha256": cfg.sha256(),
        "config": asdict(cfg),
        "seconds": round(seconds, 1),
        "base": "base",
        "experts": {s.name: s.domains for s in cfg.experts},
        "hetero": {s.name: s.arch for s in cfg.hetero},
        "safetensors_sha256": _file_hashes(root),
    }


def quick_config(seed: int = 0) -> ZooConfig:
    """A miniature zoo for tests: the same code path with very few steps and tiny models."""
    het = tuple(replace(h, steps=6, hidden=32, layers=2) for h in HETERO)
    experts = tuple(replace(e, steps=0, lr=0.0, anchor_l2=-1.0) for e in EXPERTS)
    return ZooConfig(seed=seed, vocab_size=384, hidden=32, layers=2, base_steps=30,
                     expert_steps=12, tokens_per_batch=256, examples_per_domain=100,
                     tokenizer_texts=60, experts=experts, hetero=het)  # fmt: skip
