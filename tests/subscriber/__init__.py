"""Tests of the websocket connection, the per-user subscriber and ``jfsync watch``."""
