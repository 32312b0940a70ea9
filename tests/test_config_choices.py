"""Config keys for choosing what syncs (issue 14): modes, library filters, per-person choices.

Each bad value is refused with one line naming the key and what is accepted; the examples in
``examples/`` load as written.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jfsync.config import parse_config
from jfsync.errors import ConfigError
from jfsync.model import Register
from jfsync.reload import diff_configs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

BASE = """
servers:
  - name: a
    url: http://127.0.0.1:8096
    api_key: k1{a}
  - name: b
    url: http://127.0.0.1:8196
    api_key: k2{b}
{users}
"""


def _config(a: str = "", b: str = "", users: str = "") -> str:
    return BASE.format(a=a, b=b, users=users)


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return caught.value.problems


def test_the_examples_load() -> None:
    env = {"JF_HOME_KEY": "k1", "JF_BETA_KEY": "k2", "JF_ARCHIVE_KEY": "k3"}
    config = parse_config(
        (EXAMPLES / "jfsync.directions.yaml").read_text(), base_dir=EXAMPLES, environ=env
    )
    assert [s.mode for s in config.servers] == ["both", "receive", "send"]
    beta = config.server("beta")
    assert beta.libraries is not None
    assert beta.libraries.allows("movies")
    assert not beta.libraries.allows("Shows")
    home = config.server("home")
    assert home.libraries is not None
    assert not home.libraries.allows("KIDS")
    assert home.libraries.allows("Movies")
    choice = config.users.choice_for(["Bob"])
    assert choice is not None
    assert choice.fields == [Register.PLAY_STATE]
    assert config.users.opted_out() == {"guest"}


@pytest.mark.parametrize(
    ("a", "b", "users", "expected"),
    [
        ("\n    mode: sideways", "", "", "servers[0].mode: 'sideways' is not accepted"),
        ("\n    mode: receive", "\n    mode: receive", "", "every server has mode: receive"),
        ("\n    mode: send", "\n    mode: send", "", "every server has mode: send"),
        ("\n    mode: send", "\n    mode: receive", "", ""),
        (
            "\n    libraries:\n      include: [Movies]\n      exclude: [Kids]",
            "",
            "",
            "servers[0].libraries: both include and exclude given",
        ),
        ("\n    libraries: {include: []}", "", "", "include is empty"),
        ("\n    libraries: {}", "", "", "give include (only these libraries) or exclude"),
        ("\n    libraries: {exclude: [Kids, kids]}", "", "", "library 'kids' is listed twice"),
        ("", "", "users:\n  choices:\n    bob: {fields: []}", "fields is empty"),
        ("", "", "users:\n  choices:\n    bob: {fields: [likes]}", "users.choices.bob.fields"),
        ("", "", "users:\n  choices:\n    bob: {sink: false}", "users.choices.bob.sink"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(
    a: str, b: str, users: str, expected: str
) -> None:
    text = _config(a, b, users)
    if not expected:
        parse_config(text)  # one sends, the other receives: valid
        return
    problems = _problems(text)
    assert any(expected in p for p in problems), problems


def test_the_seed_server_must_send() -> None:
    text = _config("\n    mode: receive") + "sync:\n  initial_merge: seed\n  seed_server: a\n"
    assert any("has mode: receive; the seed must send" in p for p in _problems(text))


def test_a_diff_says_what_each_edit_needs() -> None:
    old = parse_config(_config())
    same = diff_configs(old, parse_config(_config()))
    assert same.empty
    assert not same.rebuild
    live = diff_configs(
        old,
        parse_config(
            _config(
                "\n    mode: send", "\n    libraries: {exclude: [Kids]}", "users:\n  exclude: [x]"
            )
        ),
    )
    assert live.modes == ("a",)
    assert live.filters == ("b",)
    assert live.users
    assert live.policy
    assert not live.rebuild
    moved = diff_configs(old, parse_config(_config().replace("8196", "8197")))
    assert moved.reconnect == ("b",)
    assert moved.rebuild
    assert "server b: url changed (reconnecting)" in moved.lines
    kept = diff_configs(old, parse_config("ledger: /elsewhere.db\n" + _config()))
    assert kept.needs_restart == ("ledger",)
    assert kept.empty
