"""The pure matching steps: match keys, one server pair rule by rule, and groups over pairs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jfsync.config import PathRewrite
from jfsync.sync.identity import build_groups, match_pair
from jfsync.sync.index import IndexEntry, match_path, provider_keys

pytestmark = pytest.mark.timeout(10)

AB = ("a", "b")


def rules(
    ids: list[tuple[int, int]] | None = None,
    paths: list[tuple[int, int]] | None = None,
    providers: list[tuple[int, int]] | None = None,
) -> list[tuple[str, list[tuple[int, int]]]]:
    return [("id", ids or []), ("path", paths or []), ("provider", providers or [])]


def rewrite(old: str, new: str) -> PathRewrite:
    return PathRewrite.model_validate({"from": old, "to": new})


def test_path_rewrites_apply_the_first_matching_prefix_on_whole_segments() -> None:
    rules_ = [rewrite("/mnt/media", "/shared"), rewrite("/mnt", "/other")]
    assert match_path(rules_, "/mnt/media/movies/A.mkv") == "/shared/movies/A.mkv"
    assert match_path(rules_, "/mnt/mediathek/A.mkv") == "/other/mediathek/A.mkv"
    assert match_path(rules_, "/srv/A.mkv") == "/srv/A.mkv"
    assert match_path(rules_, None) is None


def test_windows_paths_compare_with_forward_slashes() -> None:
    rules_ = [rewrite("D:\\Media", "/shared")]
    assert (
        match_path(rules_, "D:\\Media\\Movies\\A (1999)\\A.mkv") == "/shared/Movies/A (1999)/A.mkv"
    )


def test_provider_keys_carry_the_type_and_skip_shared_ids() -> None:
    movie = IndexEntry(
        "m1", "Movie", provider_ids={"Imdb": "TT0133093", "Tmdb": "603", "TmdbCollection": "2344"}
    )
    assert provider_keys(movie, None) == {"Movie|imdb|tt0133093", "Movie|tmdb|603"}
    # The same ids on another type are another key.
    video = IndexEntry("v1", "Video", provider_ids={"Tmdb": "603"})
    assert provider_keys(video, None) == {"Video|tmdb|603"}


def test_episodes_are_keyed_by_their_series_ids_season_and_number() -> None:
    episode = IndexEntry("e1", "Episode", series_id="s1", season=1, episode=2)
    keys = provider_keys(episode, {"Tvdb": "81189", "Imdb": "tt0903747"})
    assert keys == {"Episode|tvdb-series|81189|1|2", "Episode|imdb-series|tt0903747|1|2"}
    # Without numbers the series ids say nothing about which episode it is.
    loose = IndexEntry("e2", "Episode", series_id="s1", season=None, episode=3)
    assert provider_keys(loose, {"Tvdb": "81189"}) == set()


def test_unique_candidates_match_and_earlier_rules_win() -> None:
    result = match_pair(AB, {}, rules(ids=[(1, 11)], paths=[(2, 12), (1, 13)], providers=[(3, 13)]))
    assert result.matched == {1: 11, 2: 12, 3: 13}
    assert result.rule_of == {1: "id", 2: "path", 3: "provider"}
    assert result.ambiguous == {}


def test_a_duplicated_provider_id_refuses_every_item_involved() -> None:
    # 1 on a has two candidates on b (11 and 12); 11 and 12 each see only 1.
    result = match_pair(AB, {}, rules(providers=[(1, 11), (1, 12), (2, 13)]))
    assert result.matched == {2: 13}
    assert set(result.ambiguous) == {1, 11, 12}
    assert set(result.ambiguous.values()) == {"provider"}


def test_an_item_whose_only_candidate_is_wanted_twice_is_ambiguous_too() -> None:
    # Two items on a share b's 11: neither may take it.
    result = match_pair(AB, {}, rules(providers=[(1, 11), (2, 11)]))
    assert result.matched == {}
    assert set(result.ambiguous) == {1, 2, 11}


def test_an_ambiguous_item_is_not_matched_by_a_later_rule() -> None:
    result = match_pair(AB, {}, rules(paths=[(1, 11), (1, 12)], providers=[(1, 11)]))
    assert result.matched == {}
    assert result.ambiguous[1] == "path"


def test_a_kept_match_survives_a_duplicate_appearing_later() -> None:
    # 1 and 11 were matched before; 12 (a copy with the same provider ids) arrived since.
    result = match_pair(AB, {1: 11}, rules(providers=[(1, 11), (1, 12)]))
    assert result.matched == {1: 11}
    assert result.kept == {1}
    assert result.ambiguous == {}  # 12 has no free candidate left: merely unmatched


def test_a_kept_match_is_dropped_when_the_items_share_no_key_any_more() -> None:
    # 11's metadata changed: it now matches 2 by provider id, and nothing ties it to 1.
    result = match_pair(AB, {1: 11}, rules(providers=[(2, 11)]))
    assert result.matched == {2: 11}
    assert result.kept == set()


def test_groups_join_pairs_across_three_servers() -> None:
    servers = {1: 1, 11: 2, 21: 3, 2: 1, 12: 2}
    ab = match_pair(("a", "b"), {}, rules(ids=[(1, 11), (2, 12)]))
    bc = match_pair(("b", "c"), {}, rules(paths=[(11, 21)]))
    ac = match_pair(("a", "c"), {}, rules(providers=[(1, 21)]))
    groups, conflicts = build_groups([ab, bc, ac], servers)
    assert conflicts == set()
    assert groups[1] == groups[11] == groups[21]
    assert groups[2] == groups[12] != groups[1]


def test_a_group_holding_two_items_of_one_server_is_refused() -> None:
    # a:1 = b:11 by id, b:11 = c:21 by path, but c:21 = a:2 by provider: a appears twice.
    servers = {1: 1, 2: 1, 11: 2, 21: 3}
    ab = match_pair(("a", "b"), {}, rules(ids=[(1, 11)]))
    bc = match_pair(("b", "c"), {}, rules(paths=[(11, 21)]))
    ac = match_pair(("a", "c"), {}, rules(providers=[(2, 21)]))
    groups, conflicts = build_groups([ab, bc, ac], servers)
    assert conflicts == {1, 2, 11, 21}
    assert all(groups[e] is None for e in conflicts)


def test_ambiguous_entries_without_any_match_are_refused() -> None:
    ab = match_pair(AB, {}, rules(providers=[(1, 11), (1, 12)]))
    groups, _ = build_groups([ab], {1: 1, 11: 2, 12: 2})
    assert groups == {1: None, 11: None, 12: None}


def _reference_match(
    kept: dict[int, int], rules_: list[tuple[str, list[tuple[int, int]]]]
) -> tuple[dict[int, int], dict[int, str], set[int], dict[int, str]]:
    """The matching rule as the design states it, written plainly: earlier matches still a
    candidate under some rule are kept; then, rule by rule over the entries still free, a
    pair matches when each side is the other's only candidate, and an entry with several
    candidates (or whose only candidate has several) is refused for the rules after."""
    matched: dict[int, int] = {}
    rule_of: dict[int, str] = {}
    kept_now: set[int] = set()
    ambiguous: dict[int, str] = {}
    taken_b: dict[int, int] = {}
    for rule, edges in rules_:
        for a, b in edges:
            if kept.get(a) == b and a not in matched:
                matched[a], rule_of[a], taken_b[b] = b, rule, a
                kept_now.add(a)
    refused: set[tuple[str, int]] = set()
    for rule, edges in rules_:
        of_a: dict[int, set[int]] = {}
        of_b: dict[int, set[int]] = {}
        for a, b in edges:
            if a in matched or b in taken_b or ("a", a) in refused or ("b", b) in refused:
                continue
            of_a.setdefault(a, set()).add(b)
            of_b.setdefault(b, set()).add(a)
        for a, bs in of_a.items():
            (b,) = bs if len(bs) == 1 else (None,)
            if b is not None and of_b[b] == {a}:
                matched[a], rule_of[a], taken_b[b] = b, rule, a
        for a in of_a:
            if a not in matched:
                refused.add(("a", a))
                ambiguous[a] = rule
        for b in of_b:
            if b not in taken_b:
                refused.add(("b", b))
                ambiguous[b] = rule
    return matched, rule_of, kept_now, ambiguous


_edges = st.lists(st.tuples(st.integers(1, 6), st.integers(11, 16)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    ids=_edges,
    paths=_edges,
    providers=_edges,
    kept=st.dictionaries(st.integers(1, 6), st.integers(11, 16), max_size=4),
)
def test_a_pair_matches_as_the_rule_says_for_any_candidates(
    ids: list[tuple[int, int]],
    paths: list[tuple[int, int]],
    providers: list[tuple[int, int]],
    kept: dict[int, int],
) -> None:
    """Whatever the candidates (repeated pairs, shared entries, stale earlier matches), the
    matcher finds the matches, keeps, rules and refusals the rule defines."""
    given_rules = rules(ids=ids, paths=paths, providers=providers)
    result = match_pair(AB, kept, [(rule, list(edges)) for rule, edges in given_rules])
    matched, rule_of, kept_now, ambiguous = _reference_match(kept, given_rules)
    assert result.matched == matched
    assert result.rule_of == rule_of
    assert result.kept == kept_now
    assert result.ambiguous == ambiguous
