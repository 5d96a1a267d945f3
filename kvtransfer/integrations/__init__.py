"""Integrations of kvtransfer with serving frameworks (each imports its framework lazily)."""
