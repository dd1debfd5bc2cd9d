"""Evaluation used by search rounds and the demo: offline domain corpora and per-domain scores."""
