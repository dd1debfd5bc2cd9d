"""The built-in expert zoo: `build()` makes it offline and deterministically (see docs/zoo.md)."""

from node.zoo.build import EXPERTS, HETERO, ZooConfig, build, default_dir, load_manifest

__all__ = ["EXPERTS", "HETERO", "ZooConfig", "build", "default_dir", "load_manifest"]
