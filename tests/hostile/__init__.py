"""Hostile and broken input: bad configs, ledgers, frames and responses (issue 12)."""
