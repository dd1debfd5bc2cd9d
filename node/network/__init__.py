"""Networking: `unode join` (DHT + p2pd lifecycle, announcements, the blob service), verified
fetches with resume and fail-over, the `unode://` merge source, and summary transfer.

Entry points: `node.network.node.run_join`, `node.network.commands.run_fetch / run_peers /
run_experts`, `node.network.fetch.fetch_expert`, `node.network.source.open_network_sources`,
`node.network.summaries.fetch_summary`, `node.network.discovery` (what the DHT knows, verified).
"""
