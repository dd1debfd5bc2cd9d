"""unode's wire protocol: what two peers must agree on, byte for byte. Never imports node/."""
