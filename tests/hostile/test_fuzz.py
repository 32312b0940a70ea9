"""Property-based fuzzing of everything a server or a user hands jfsync to parse.

The websocket message parser (:mod:`jfsync.jellyfin.messages`), the REST response models
(:mod:`jfsync.jellyfin.wire`) and the config loader (:mod:`jfsync.config`) get arbitrary and
hostile input: each answers with a value or its one clear error (MalformedMessageError,
ValidationError, ConfigError), never another exception and never a hang. The default run
keeps to a small budget (:data:`FAST`, a few seconds in all); the ``_long`` variants run the
same properties far longer under ``-m slow``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from jfsync.config import Config, parse_config
from jfsync.errors import ConfigError
from jfsync.jellyfin.messages import MalformedMessageError, parse_message, parse_message_steps
from jfsync.jellyfin.wire import (
    AuthenticationResult,
    BaseItemDto,
    PublicSystemInfo,
    QueryResult,
    QuickConnectResult,
    SystemInfo,
    UserDto,
    UserItemDataDto,
    format_date,
    update_body,
)

pytestmark = pytest.mark.timeout(120)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))

# --------------------------------------------------------------------------- strategies

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)


def _json_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6)


json_values = st.recursive(scalars, _json_containers, max_leaves=25)
ids = st.one_of(
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(str),
    st.text(max_size=40),
    st.integers(),
)
dates = st.one_of(
    st.datetimes(timezones=st.just(UTC)).map(format_date),
    st.sampled_from(
        [
            "0001-01-01T00:00:00.0000000Z",
            "9999-12-31T23:59:59.9999999Z",
            "1969-12-31T23:59:59.5Z",
            "2025-03-01T20:15:42.1234567+05:00",
            "2025-02-30T00:00:00Z",
            "yesterday",
            "",
        ]
    ),
    scalars,
)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([2**63 - 1, 2**63, -(2**63), 2**31]),
    scalars,
)
user_item_data = st.fixed_dictionaries(
    {},
    optional={
        "Rating": numbers,
        "PlayedPercentage": numbers,
        "UnplayedItemCount": numbers,
        "PlaybackPositionTicks": numbers,
        "PlayCount": numbers,
        "IsFavorite": st.one_of(st.booleans(), scalars),
        "Likes": st.one_of(st.booleans(), scalars),
        "LastPlayedDate": dates,
        "Played": st.one_of(st.booleans(), scalars),
        "Key": scalars,
        "ItemId": ids,
    },
)
message_types = st.sampled_from(
    [
        "UserDataChanged",
        "LibraryChanged",
        "ForceKeepAlive",
        "KeepAlive",
        "ServerRestarting",
        "ServerShuttingDown",
        "Sessions",
        "",
    ]
)
datas = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"UserId": ids, "UserDataList": st.lists(st.one_of(user_item_data, st.none(), scalars))}
    ),
    st.fixed_dictionaries(
        {},
        optional={
            k: st.one_of(st.lists(ids, max_size=8), st.none(), scalars)
            for k in ("ItemsAdded", "ItemsRemoved", "ItemsUpdated", "FoldersAddedTo")
        },
    ),
)
messages = st.fixed_dictionaries(
    {"MessageType": st.one_of(message_types, scalars)},
    optional={"Data": datas, "MessageId": st.one_of(ids, scalars)},
)


def dumps(value: Any, indent: bool) -> str:
    return json.dumps(value, indent=2 if indent else None)


# --------------------------------------------------------------------------- messages


def check_any_frame(frame: str | bytes) -> None:
    try:
        parse_message(frame)
    except MalformedMessageError as err:
        text = str(err)
        assert text.startswith("malformed "), text


def check_message(value: dict[str, Any], indent: bool) -> None:
    """Whole and stepped parses agree, and either gives a message or a MalformedMessageError."""
    text = dumps(value, indent)
    whole: Any
    try:
        whole = parse_message(text)
    except MalformedMessageError as err:
        whole = err
    stepped: Any
    steps = parse_message_steps(text, step=2)  # tiny steps: every list takes the stepped path
    try:
        while True:
            next(steps)
    except StopIteration as done:
        stepped = done.value
    except MalformedMessageError as err:
        stepped = err
    if isinstance(whole, MalformedMessageError):
        assert isinstance(stepped, MalformedMessageError), (text, stepped)
    else:
        assert stepped == whole, text


test_any_frame = FAST(given(st.one_of(st.text(), st.binary()))(check_any_frame))
test_message_shaped_frames = FAST(given(messages, st.booleans())(check_message))
test_any_frame_long = pytest.mark.slow(
    LONG(given(st.one_of(st.text(), st.binary()))(check_any_frame))
)
test_message_shaped_frames_long = pytest.mark.slow(
    LONG(given(messages, st.booleans())(check_message))
)


@pytest.mark.parametrize(
    "frame",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"MessageType":"Sessions","Data":' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"MessageType": "UserDataChanged", "Data": {"UserId": "' + "a" * 32 + '"}}' + " x",
        '{"MessageType":"UserDataChanged","Data":{"UserId":"'
        + "0" * 32
        + '","UserDataList":['
        + ",".join(['{"PlayCount":NaN}'] * 2000)
        + "]}}",
    ],
    ids=["deep", "deep_in_data", "trailing_garbage", "nan_in_a_long_list"],
)
def test_hostile_frames_are_malformed_not_crashes(frame: str) -> None:
    with pytest.raises(MalformedMessageError):
        parse_message(frame)


# --------------------------------------------------------------------------- REST models

MODELS: list[type[BaseModel] | TypeAdapter[Any]] = [
    UserItemDataDto,
    BaseItemDto,
    UserDto,
    PublicSystemInfo,
    SystemInfo,
    AuthenticationResult,
    QuickConnectResult,
    TypeAdapter(QueryResult[BaseItemDto]),
    TypeAdapter(list[UserDto]),
]


def validate(model: type[BaseModel] | TypeAdapter[Any], value: Any) -> Any:
    if isinstance(model, TypeAdapter):
        return model.validate_python(value)
    return model.model_validate(value)


def check_rest_body(index: int, value: Any) -> None:
    try:
        parsed = validate(MODELS[index], value)
    except ValidationError:
        return
    if isinstance(parsed, BaseItemDto) and parsed.user_data is not None:
        check_user_data(parsed.user_data)


def check_user_data(dto: UserItemDataDto) -> None:
    """What parses converts and writes back without error, in values SQLite can store."""
    data = dto.to_user_data()
    state = data.play_state
    assert -(2**63) <= state.play_count < 2**63
    assert -(2**63) <= state.position_ticks < 2**63
    assert data.rating is None or math.isfinite(data.rating)
    body = update_body(data)
    json.dumps(body, allow_nan=False)
    if state.last_played_s is not None:
        # Floor to the second: never later than the server's date, less than a second before.
        assert dto.last_played_date is not None
        exact = dto.last_played_date
        written = datetime.fromisoformat(body["LastPlayedDate"].replace("0Z", "+00:00"))
        assert timedelta(0) <= exact - written < timedelta(seconds=1)


def check_user_item_data(value: dict[str, Any]) -> None:
    try:
        dto = UserItemDataDto.model_validate(value)
    except ValidationError:
        return
    check_user_data(dto)


model_indexes = st.integers(min_value=0, max_value=len(MODELS) - 1)
test_rest_bodies = FAST(given(model_indexes, json_values)(check_rest_body))
test_user_item_data = FAST(given(user_item_data)(check_user_item_data))
test_rest_bodies_long = pytest.mark.slow(LONG(given(model_indexes, json_values)(check_rest_body)))
test_user_item_data_long = pytest.mark.slow(LONG(given(user_item_data)(check_user_item_data)))


# --------------------------------------------------------------------------- config

NOWHERE = Path("/nonexistent-jfsync-fuzz")
VALID: dict[str, Any] = {
    "servers": [
        {"name": "home", "url": "http://127.0.0.1:1", "api_key": "a" * 32},
        {"name": "cabin", "url": "http://127.0.0.1:2", "api_key": "b" * 32},
    ]
}
KEYS = [
    "ledger",
    "status",
    "servers",
    "users",
    "sync",
    "logging",
    "name",
    "url",
    "api_key",
    "api_key_file",
    "token",
    "password",
    "listen",
    "timeout_s",
    "max_message_size",
    "path_rewrites",
    "from",
    "to",
    "match",
    "map",
    "exclude",
    "fields",
    "initial_merge",
    "seed_server",
    "reconcile_interval",
    "level",
    "verify_tls",
    "${X}",
    "<<",
]


def _config_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    keys = st.sampled_from(KEYS) | st.text(max_size=6)
    return st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5)


config_values = st.recursive(
    scalars | st.sampled_from(["${HOME}", "${NOPE}", "10s", "64MiB", "http://u:p@h", "*a"]),
    _config_containers,
    max_leaves=20,
)


def check_config_text(text: str) -> None:
    try:
        config = parse_config(text, base_dir=NOWHERE, environ={})
    except ConfigError as err:
        problems = err.problems
    else:
        assert isinstance(config, Config)
        return
    assert problems
    assert all(isinstance(p, str) and "\n" not in p for p in problems), problems


def check_config_tree(mutation: dict[str, Any], where: int) -> None:
    """A valid config with one part replaced by something random."""
    tree = json.loads(json.dumps(VALID))
    if where == 0:
        tree.update(mutation)
    else:
        tree["servers"][where - 1].update(mutation)
    try:
        text = yaml.safe_dump(tree, allow_unicode=True)
    except yaml.YAMLError:
        return
    check_config_text(text)


mutations = st.dictionaries(st.sampled_from(KEYS), config_values, min_size=1, max_size=3)
test_config_text = FAST(given(st.text())(check_config_text))
test_config_tree = FAST(given(mutations, st.integers(0, 2))(check_config_tree))
test_config_text_long = pytest.mark.slow(LONG(given(st.text())(check_config_text)))
test_config_tree_long = pytest.mark.slow(
    LONG(given(mutations, st.integers(0, 2))(check_config_tree))
)


@pytest.mark.parametrize(
    "text",
    [
        "a: &a ["
        + ", ".join(["x"] * 50)
        + "]\n"
        + "".join(
            f"{n}: &{n} [" + ", ".join([f"*{p}"] * 50) + "]\n"
            for p, n in zip("ab", "bc", strict=True)
        ),
        "servers: " + "{a: " * 5000 + "1" + "}" * 5000,
        "servers: &s [*s]\n",
        "? [a, b]\n: c\n",
        "servers: !!python/object/apply:os.system ['true']\n",
        "\x00",
    ],
    ids=["wide_alias_bomb", "deep_mapping", "self_alias", "complex_key", "python_tag", "nul"],
)
def test_hostile_yaml_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(text, base_dir=NOWHERE, environ={})


_: Callable[..., None] = check_any_frame  # the properties are plain functions, reused above


def test_a_secret_file_path_with_a_newline_is_named_on_one_line() -> None:
    """Found by the long fuzz run: ``api_key_file: "\\n"`` gave a two-line error."""
    tree = json.loads(json.dumps(VALID))
    tree["servers"][0].pop("api_key", None)
    tree["servers"][0]["api_key_file"] = "bad\nname"
    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_dump(tree), base_dir=NOWHERE, environ={})
    [problem] = [p for p in caught.value.problems if "api_key_file" in p]
    assert "\n" not in problem
    assert "'" in problem  # quoted, with the newline escaped
