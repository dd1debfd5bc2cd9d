"""A node's observability: Prometheus counters (`registry`), JSON log lines (`logs`) and the
small `/unode/stats/1` P2P stream that tells a dashboard a node's uptime and traffic (`stats`)."""
