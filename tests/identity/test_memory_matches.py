"""The whole-library structures of a match, in compact form, answer as the plain dicts did.

After a complete match, each server pair's matches are kept in sorted arrays with the changes
of later incremental rematches on top (folded in when they grow): 2 x 200,000 matched items
then take a few MB instead of tens. Whatever sequence of incremental rematches follows, the kept
matches, rules and refusals must be those of a plain dict updated the same way, before and after
the changes are folded in. The same holds for the entry -> server table and the groups a
full match streams to the id maps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jfsync.sync.identity import PairResult, _EntryServers, _Groups, _Matches, _PairState
from jfsync.sync.index import RULES, entry_table

pytestmark = pytest.mark.timeout(60)

AB = ("a", "b")

#: Entries 0..999 on a, 1000..1999 on b.
entries_a = st.integers(min_value=0, max_value=999)
rules_ = st.sampled_from(RULES)
matches = st.dictionaries(entries_a, st.tuples(st.integers(1000, 1999), rules_), max_size=300)


def result_of(found: dict[int, tuple[int, str]], ambiguous: dict[int, str]) -> PairResult:
    return PairResult(
        AB,
        matched={a: b for a, (b, _) in found.items()},
        rule_of={a: rule for a, (_, rule) in found.items()},
        ambiguous=dict(ambiguous),
    )


def kept(state: _PairState) -> dict[int, tuple[int, str]]:
    return {a: (b, rule) for a, b, rule in state.matches.items()}


@settings(max_examples=80, deadline=None)
@given(
    first=matches,
    first_ambiguous=st.dictionaries(st.integers(0, 1999), rules_, max_size=20),
    rematches=st.lists(
        st.tuples(
            st.sets(entries_a, max_size=200),
            matches,
            st.dictionaries(entries_a, rules_, max_size=10),
        ),
        max_size=8,
    ),
)
def test_incremental_rematches_keep_what_a_plain_dict_would(
    first: dict[int, tuple[int, str]],
    first_ambiguous: dict[int, str],
    rematches: list[tuple[set[int], dict[int, tuple[int, str]], dict[int, str]]],
) -> None:
    with patch.object(_Matches, "FOLD_MIN", 0):  # fold whenever an eighth changed
        check_rematches(first, first_ambiguous, rematches)


def check_rematches(
    first: dict[int, tuple[int, str]],
    first_ambiguous: dict[int, str],
    rematches: list[tuple[set[int], dict[int, tuple[int, str]], dict[int, str]]],
) -> None:
    state = _PairState.of(result_of(first, first_ambiguous))
    model = dict(first)
    model_ambiguous = dict(first_ambiguous)
    assert kept(state) == model
    for scope, fresh, fresh_ambiguous in rematches:
        # A rematch only finds results for the entries in its scope.
        fresh = {a: m for a, m in fresh.items() if a in scope}
        fresh_ambiguous = {e: r for e, r in fresh_ambiguous.items() if e in scope}
        state.replace(scope, result_of(fresh, fresh_ambiguous))
        state.matches.fold()
        for entry in scope:
            model.pop(entry, None)
            model_ambiguous.pop(entry, None)
        model.update(fresh)
        model_ambiguous.update(fresh_ambiguous)
        assert kept(state) == model
        assert len(state.matches) == len(model)
        assert state.ambiguous == model_ambiguous
        counted = {rule: n for rule, n in state.rules.items() if n}
        expected: dict[str, int] = {}
        for _, rule in model.values():
            expected[rule] = expected.get(rule, 0) + 1
        assert counted == expected
        for entry in {*range(0, 1000, 7), *model, *scope}:
            assert state.matches.get(entry) == model.get(entry)
            assert (entry in state.matches) == (entry in model)


def test_changes_are_folded_into_the_arrays_and_lookups_stay_right() -> None:
    everything = {a: (a + 10_000, RULES[a % 3]) for a in range(20_000)}
    found = _Matches(
        {a: b for a, (b, _) in everything.items()}, {a: r for a, (_, r) in everything.items()}
    )
    # Unmatch every third entry, rematch every seventh to a new partner: far more changes
    # than an eighth of the arrays, so they are folded in.
    for a in range(0, 20_000, 3):
        assert found.pop(a) == everything.pop(a)
    for a in range(0, 20_000, 7):
        found.put(a, a + 50_000, "path")
        everything[a] = (a + 50_000, "path")
    found.fold()
    assert found._changed == {}
    assert found._dropped == set()
    assert len(found) == len(everything)
    assert {a: (b, r) for a, b, r in found.items()} == everything
    assert [a for a, _, _ in found.items()] == sorted(everything)
    assert found.get(3) is None
    assert found.get(7) == (50_007, "path")
    assert found.pop(-5) is None


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.integers(1, 5000), st.integers(0, 3), max_size=400))
def test_entry_servers_in_one_byte_an_entry_answer_as_the_dict(found: dict[int, int]) -> None:
    compact, counts = _entry_servers(found)
    assert isinstance(compact, _EntryServers)
    assert dict(compact.items()) == found
    assert sorted(compact) == sorted(found)
    assert len(compact) == len(found)
    assert counts == Counter(found.values())
    for entry in range(-2, 5003):
        assert compact.get(entry, -7) == found.get(entry, -7)
        assert (entry in compact) == (entry in found)


def test_entry_servers_that_do_not_fit_a_byte_table_stay_a_dict() -> None:
    sparse = {1: 0, 50_000_000: 1}
    assert _entry_servers(sparse) == (sparse, Counter({0: 1, 1: 1}))
    many_servers = {1: 0, 2: 300}
    assert _entry_servers(many_servers)[0] == many_servers


def _entry_servers(found: dict[int, int]) -> tuple[Mapping[int, int], Counter[int]]:
    """What the full match holds for an index whose entries are ``found``: the table as the
    index builds it from its rows, over the servers present."""
    sids = set(found.values())
    table = entry_table(
        iter(found.items()), len(found), min(found, default=0), max(found, default=0), sids
    )
    return _EntryServers.of(table, sids)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.integers(1, 10**9), st.none() | st.integers(1, 10**9), max_size=300))
def test_groups_in_arrays_answer_as_the_dict(groups: dict[int, int | None]) -> None:
    compact = _Groups.of(groups)
    assert dict(compact.items()) == groups
    assert len(compact) == len(groups)
    assert list(compact) == sorted(groups)
    for entry, group in groups.items():
        assert compact[entry] == group
    with pytest.raises(KeyError):
        compact[0]
