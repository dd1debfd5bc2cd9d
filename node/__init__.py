"""unode's node: what a participant does (hold experts, merge, fuse, talk to the network, run rounds)."""

__version__ = "0.1.0"
