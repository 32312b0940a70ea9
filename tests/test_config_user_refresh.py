"""The ``sync.user_refresh_interval`` key: its default, durations, and a period too short."""

from __future__ import annotations

from pathlib import Path

import pytest

from jfsync.config import parse_config
from jfsync.errors import ConfigError

pytestmark = pytest.mark.timeout(10)

BASE = """
servers:
  - {name: a, url: "http://127.0.0.1:8096", api_key: key-a}
  - {name: b, url: "http://127.0.0.1:8196", api_key: key-b}
"""


def test_the_user_list_is_read_again_every_ten_minutes_by_default(tmp_path: Path) -> None:
    config = parse_config(BASE, base_dir=tmp_path, environ={})
    assert config.sync.user_refresh_interval == 600.0


@pytest.mark.parametrize(("given", "seconds"), [("30s", 30.0), ("2m", 120.0), (3600, 3600.0)])
def test_the_refresh_period_takes_durations(tmp_path: Path, given: object, seconds: float) -> None:
    text = BASE + f"sync:\n  user_refresh_interval: {given}\n"
    assert parse_config(text, base_dir=tmp_path, environ={}).sync.user_refresh_interval == seconds


@pytest.mark.parametrize("given", ["5s", "500ms", "0", "soon"])
def test_a_refresh_period_too_short_or_not_a_duration_is_named(tmp_path: Path, given: str) -> None:
    text = BASE + f"sync:\n  user_refresh_interval: {given}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=tmp_path, environ={})
    (problem,) = info.value.problems
    assert problem.startswith("sync.user_refresh_interval: "), problem
    if given in ("5s", "500ms"):
        assert "at least 10s" in problem
