"""`unode dashboard`: a verified, read-only view of a network for coordinators.

`snapshot` gathers what the DHT proves (peers, experts, rounds, search scores) plus each peer's
self-reported stats; `render` draws it with rich; `app` runs the live view and its keys.
"""
