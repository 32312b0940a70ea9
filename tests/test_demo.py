"""The README's main command: ``jfsync demo --once`` converges and says so."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.timeout(120)
def test_demo_once_converges_and_exits_zero() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "jfsync", "demo", "--once", "--library-size", "150"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "✓ all 300 (user, item) pairs are identical on home and cabin" in out
    assert "Demo passed" in out
    assert "✗" not in out
    # No secret from the demo's config shows up anywhere.
    for secret in ("home-demo-key", "cabin-demo-key", "alice-demo-password"):
        assert secret not in out
        assert secret not in result.stderr
