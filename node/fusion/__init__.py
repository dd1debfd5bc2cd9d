"""Heterogeneous knowledge fusion (FuseLLM / FuseChat): summaries, alignment, fusion training."""
