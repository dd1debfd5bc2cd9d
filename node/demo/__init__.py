"""`unode demo`: three local `unode join` nodes host the built-in experts and run a merge, a
search and a fusion round through the real network; the results are scored and plotted."""

from node.demo.run import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
