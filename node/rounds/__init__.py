"""Cooperative rounds: layer-sharded merge rounds, evolutionary layer-wise search, verification."""
