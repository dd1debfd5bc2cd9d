"""Homogeneous weight merging: methods, recipes (plans) and the streaming executor."""
