"""Config loading: the documented shape loads, secrets resolve, every bad input is named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jfsync.cli import main
from jfsync.config import load_config, parse_config
from jfsync.errors import ConfigError
from jfsync.model import Register

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

MINIMAL = """
ledger: ./jfsync.db
status:
  listen: 127.0.0.1:8097
servers:
  - name: a
    url: http://127.0.0.1:8096
    api_key: ${JF_A_KEY}
  - name: b
    url: http://127.0.0.1:8196
    api_key_file: ./b.key
"""


def _problems(text: str, tmp_path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=tmp_path, environ={"JF_A_KEY": "k"} if env is None else env)
    return info.value.problems


def test_issue_shape_loads_with_env_and_file_secrets(tmp_path: Path) -> None:
    (tmp_path / "b.key").write_text("secret-b\n")
    config = parse_config(MINIMAL, base_dir=tmp_path, environ={"JF_A_KEY": "secret-a"})
    assert [s.name for s in config.servers] == ["a", "b"]
    assert config.servers[0].api_key is not None
    assert config.servers[0].api_key.get_secret_value() == "secret-a"
    assert config.servers[1].api_key is not None
    assert config.servers[1].api_key.get_secret_value() == "secret-b"
    assert config.status.host == "127.0.0.1"
    assert config.status.port == 8097
    assert config.ledger == tmp_path / "jfsync.db"
    assert config.sync.reconcile_interval == 6 * 3600
    assert set(config.sync.fields) == set(Register)
    assert "secret-a" not in repr(config)
    assert "secret-b" not in repr(config)


def test_example_config_is_complete_and_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JF_HOME_KEY", raising=False)
    config = load_config(EXAMPLES / "jfsync.yaml")
    assert [s.name for s in config.servers] == ["home", "cabin"]
    assert config.servers[0].rewrite_path("/mnt/media/movies/x.mkv") == "/media/movies/x.mkv"
    assert config.servers[0].rewrite_path("/other/x.mkv") == "/other/x.mkv"
    assert config.users.exclude == ["guest"]
    cred = config.servers[1].users["alice"]
    assert cred.password is not None


def test_bad_url_names_key_value_and_accepted_form(tmp_path: Path) -> None:
    text = MINIMAL.replace("http://127.0.0.1:8196", "htp://x").replace(
        "api_key_file: ./b.key", "api_key: k2"
    )
    assert _problems(text, tmp_path) == [
        "servers[1].url: not a URL ('htp://x'); expected http:// or https:// and a host"
    ]


def test_one_problem_per_line_for_several_mistakes(tmp_path: Path) -> None:
    text = """
servers:
  - name: a
    url: http://127.0.0.1:8096
    api_key: k
    timeout_s: soon
  - name: b
    urll: http://127.0.0.1:8196
    api_key: k
sync:
  initial_merge: guess
"""
    problems = _problems(text, tmp_path)
    assert any(p.startswith("servers[0].timeout_s: not a duration ('soon')") for p in problems)
    assert any(
        p.startswith("servers[1].urll: unknown key; accepted keys here: name, url")
        for p in problems
    )
    assert any(p.startswith("servers[1].url: required but missing") for p in problems)
    assert any(
        p.startswith("sync.initial_merge: 'guess' is not accepted; expected 'merge' or 'seed'")
        for p in problems
    )
    assert len(problems) == 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "servers:\n  - {name: a, url: 'http://h', api_key: k}\n",
            "(top level): at least two servers are needed; add another under servers",
        ),
        (
            "servers:\n  - {name: a, url: 'http://h', api_key: k}\n"
            "  - {name: a, url: 'http://i', api_key: k}\n",
            "(top level): server name 'a' is used twice; names must be unique",
        ),
        (
            "servers:\n  - {name: a, url: 'http://h'}\n  - {name: b, url: 'http://i', api_key: k}\n",
            "servers[0]: no API key; give api_key (or ${ENV}) or api_key_file",
        ),
        (
            "servers:\n  - {name: a, url: 'http://h', api_key: k}\n"
            "  - {name: b, url: 'http://i', api_key: k}\nsync: {initial_merge: seed}\n",
            "(top level): sync.initial_merge is 'seed' but sync.seed_server is not set",
        ),
        (
            "servers:\n  - {name: a, url: 'http://h', api_key: k}\n"
            "  - {name: b, url: 'http://i', api_key: k}\nstatus: {listen: 'localhost'}\n",
            "status.listen: not host:port ('localhost'); expected e.g. 127.0.0.1:8097",
        ),
        (
            "servers:\n  - {name: a, url: 'http://h', api_key: k}\n"
            "  - {name: b, url: 'http://i', api_key: k}\nsync: {fields: [favorite, stars]}\n",
            "sync.fields[1]: 'stars' is not accepted; expected 'favorite', 'rating' or 'play_state'",
        ),
        ("- just\n- a list\n", "<config>: expected a mapping of keys at the top level"),
        ("servers: [\n", "<config>: not valid YAML at line 2, column 1"),
    ],
)
def test_each_mistake_is_explained(tmp_path: Path, text: str, expected: str) -> None:
    problems = _problems(text, tmp_path)
    assert len(problems) == 1
    assert problems[0].startswith(expected), problems


def test_missing_env_var_and_unreadable_secret_file(tmp_path: Path) -> None:
    problems = _problems(MINIMAL, tmp_path, env={})
    assert problems == [
        "servers[0].api_key: environment variable JF_A_KEY is not set; "
        "set it, or use ${JF_A_KEY:-default}",
        f"servers[1].api_key_file: cannot read {tmp_path / 'b.key'} (No such file or directory); "
        "expected a readable file holding the secret",
    ]


def test_a_secret_file_that_is_binary_or_a_nul_path_is_named_not_a_crash(
    tmp_path: Path,
) -> None:
    (tmp_path / "b.key").write_bytes(b"\xff\xfe key")
    assert _problems(MINIMAL, tmp_path) == [
        f"servers[1].api_key_file: {tmp_path / 'b.key'} is not UTF-8 text; "
        "expected a text file holding the secret"
    ]
    nul = MINIMAL.replace("./b.key", '"./b\\0.key"')
    assert _problems(nul, tmp_path) == [
        "servers[1].api_key_file: the path holds a NUL character; "
        "expected the path of a file holding the secret"
    ]


def test_secret_values_never_appear_in_errors(tmp_path: Path) -> None:
    text = (
        "servers:\n  - {name: a, url: 'http://h', api_key: [s3cr3t-value]}\n"
        "  - {name: b, url: 'http://i', api_key: k}\n"
    )
    problems = _problems(text, tmp_path)
    assert problems
    assert all("s3cr3t-value" not in p for p in problems)


def test_check_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("servers:\n  - {name: a, url: 'htp://x', api_key: k}\n")
    assert main(["check", "--offline", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "servers[0].url: not a URL ('htp://x')" in err
    good = tmp_path / "good.yaml"
    (tmp_path / "b.key").write_text("kb")
    good.write_text(MINIMAL.replace("${JF_A_KEY}", "ka"))
    assert main(["check", "--offline", "--config", str(good)]) == 0
    assert "config is valid (2 servers: a, b)" in capsys.readouterr().out


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "jfsync", "check", "--offline", "--config", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "cannot read the config file" in result.stderr
