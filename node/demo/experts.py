"""The demo's models: the built-in zoo (built on first use) or, with `--quick`, tiny untrained
`node.toymodels` models (a Llama base, two fine-tune-like variants, a GPT-2 fusion target)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Say = Callable[[str], None]


@dataclass(frozen=True)
class Expert:
    name: str
    path: Path
    domain: str  # announced by its host; a scoring peer scores on this domain's held-out split


@dataclass(frozen=True)
class DemoModels:
    kind: str  # "zoo" or "quick"
    base: Expert
    experts: tuple[Expert, ...]  # homogeneous: fine-tuned from `base`
    target: Expert  # heterogeneous (other architecture and tokenizer): the fusion target
    domains: tuple[str, ...]  # evaluation domains of the table
    eval_n: int  # held-out texts per domain
    em_n: int  # generated answers per task domain (exact match)
    merge_weight: float  # uniform task-arithmetic weight of the merge round


def unode_home() -> Path:
    return Path(os.environ.get("UNODE_HOME") or Path.home() / ".cache" / "unode")


def quick_models(root: Path, say: Say) -> DemoModels:
    """Tiny random models, built once (seconds) and cached under `root`."""
    out = root / "demo-quick"
    names = ("base", "ft-prose", "ft-python", "gpt2-target")
    if not all((out / n / "config.json").is_file() for n in names):
        say(f"building tiny toy models in {out}")
        _build_quick(out)
    return DemoModels(
        kind="quick",
        base=Expert("base", out / "base", "general"),
        experts=(
            Expert("ft-prose", out / "ft-prose", "prose"),
            Expert("ft-python", out / "ft-python", "python"),
        ),
        target=Expert("gpt2-target", out / "gpt2-target", "general"),
        domains=("arithmetic", "prose"),
        eval_n=6,
        em_n=3,
        merge_weight=0.5,
    )


def _build_quick(out: Path) -> None:
    from node import toymodels

    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    bpe = toymodels.train_tokenizer(vocab_size=512, kind="bpe")
    base = toymodels.build_model(tmp / "base", arch="llama", tokenizer=bpe, seed=1)
    toymodels.make_variant(base, tmp / "ft-prose", seed=101)
    toymodels.make_variant(base, tmp / "ft-python", seed=102)
    uni = toymodels.train_tokenizer(vocab_size=600, kind="unigram")
    toymodels.build_model(tmp / "gpt2-target", arch="gpt2", tokenizer=uni, seed=2, layers=2)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def zoo_models(root: Path, say: Say) -> DemoModels:
    """The built-in zoo in `root/zoo`, built first (minutes, with progress) when absent."""
    from node.eval import corpora
    from node.zoo import build, load_manifest

    zoo = root / "zoo"
    manifest = load_manifest(zoo)
    if manifest is None or "experts" not in manifest:
        say(f"no built zoo in {zoo}: building it (about 10 min on 2 cores)")
        manifest = build(zoo, log=lambda m: say(f"zoo: {m}"), progress=False)
    experts = tuple(
        Expert(name, zoo / name, _card_domain(zoo / name)) for name in sorted(manifest["experts"])
    )
    target = sorted(manifest["hetero"])[0]
    return DemoModels(
        kind="zoo",
        base=Expert("base", zoo / manifest.get("base", "base"), "general"),
        experts=experts,
        target=Expert(target, zoo / target, "general"),
        domains=(*corpora.DOMAINS, *corpora.TWO_SKILL_DOMAINS),
        eval_n=64,
        em_n=40,
        merge_weight=0.8,  # keeps >= 90 % of each expert here; 1.0 trades arithmetic for two-skill
    )


def card_domains(model_dir: Path) -> list[str]:
    """The domains a zoo model was trained for (its `zoo_card.json`); [] without a card."""
    card = model_dir / "zoo_card.json"
    if not card.is_file():
        return []
    return [str(d) for d in json.loads(card.read_text()).get("domains") or []]


def _card_domain(model_dir: Path) -> str:
    domains = card_domains(model_dir) or ["general"]
    return domains[-1]  # `code` is logic + python: python has the larger held-out split
