"""Test support code shared by several test folders (pytest plugins, helpers)."""
