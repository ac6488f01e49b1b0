"""TopicTrie and filter validation against an independent model of MQTT filter semantics.

The reference matcher below is written from the MQTT 5 spec (§4.7) and is cross-checked with
paho's `topic_matches_sub`, so the trie is compared with two independent implementations.
"""

from __future__ import annotations

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.routing.topic_trie import TopicTrie, filter_matches, validate_filter


def reference_match(topic_filter: str, topic: str) -> bool:
    """MQTT filter semantics, level by level (MQTT-4.7.1, 4.7.2-1)."""
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False

    def walk(i: int, j: int) -> bool:
        if i == len(f_levels):
            return j == len(t_levels)
        if f_levels[i] == "#":
            return True  # the rest, including no level at all (`a/#` matches `a`)
        if j == len(t_levels):
            return False
        return (f_levels[i] == "+" or f_levels[i] == t_levels[j]) and walk(i + 1, j + 1)

    return walk(0, 0)


TOPIC_LEVEL = st.sampled_from(["a", "b", "c", "", "x y", "é", "A"])
FIRST_TOPIC_LEVEL = st.one_of(TOPIC_LEVEL, st.sampled_from(["$SYS", "$a"]))
FILTER_LEVEL = st.one_of(TOPIC_LEVEL, st.just("+"))


@st.composite
def topics(draw: st.DrawFn) -> str:
    first = draw(FIRST_TOPIC_LEVEL)
    rest = draw(st.lists(TOPIC_LEVEL, max_size=4))
    return "/".join([first, *rest]) or "a"  # a topic name is at least one character


@st.composite
def filters(draw: st.DrawFn) -> str:
    first = draw(st.one_of(FILTER_LEVEL, st.sampled_from(["$SYS", "$a"])))
    levels = [first, *draw(st.lists(FILTER_LEVEL, max_size=4))]
    if draw(st.booleans()):
        levels.append("#")
    if levels == ["", "#"] and draw(st.booleans()):
        levels = ["#"]
    return "/".join(levels) or "+"  # a filter is at least one character


def test_reference_agrees_with_paho_on_examples() -> None:
    cases = [
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("a/+", "a", False),
        ("a/+", "a/", True),
        ("+/+", "/x", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS", True),
        ("a/b", "a/b/", False),
    ]
    for f, t, expected in cases:
        assert reference_match(f, t) is expected, (f, t)
        assert paho.topic_matches_sub(f, t) is expected, (f, t)


@settings(max_examples=400, deadline=None)
@given(filters(), topics())
def test_reference_matches_paho(topic_filter: str, topic: str) -> None:
    assert reference_match(topic_filter, topic) == paho.topic_matches_sub(topic_filter, topic)


@settings(max_examples=400, deadline=None)
@given(filters(), topics())
def test_filter_matches_is_mqtt_semantics(topic_filter: str, topic: str) -> None:
    assert filter_matches(topic_filter, topic) == reference_match(topic_filter, topic)


@settings(max_examples=300, deadline=None)
@given(st.lists(filters(), min_size=1, max_size=12), st.lists(topics(), min_size=1, max_size=6))
def test_trie_matches_exactly_the_matching_filters(filter_list: list[str], topic_list: list[str]) -> None:
    trie: TopicTrie[int] = TopicTrie()
    for index, topic_filter in enumerate(filter_list):
        trie.insert(topic_filter, index)
    assert len(trie) == len(filter_list)
    for topic in topic_list:
        found = trie.match(topic)
        expected = [i for i, f in enumerate(filter_list) if reference_match(f, topic)]
        # Each matching filter once, duplicates kept apart (two routes on one filter both run).
        assert sorted(found) == expected, (topic, filter_list)


def test_trie_multi_level_matches_parent_and_dollar_topics() -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.extend([("a/#", "a/#"), ("#", "#"), ("+/b", "+/b"), ("$SYS/#", "$SYS/#"), ("$SYS/+", "$SYS/+")])
    assert sorted(trie.match("a")) == ["#", "a/#"]
    assert sorted(trie.match("a/b")) == ["#", "+/b", "a/#"]
    assert sorted(trie.match("$SYS/b")) == ["$SYS/#", "$SYS/+"]
    assert sorted(trie.match("$SYS")) == ["$SYS/#"]
    assert trie.match("zzz/c/d") == ["#"]


@pytest.mark.parametrize("bad", ["", "a/#/b", "#/a", "a/b#", "a+/b", "a/+x", "a/#x"])
def test_validate_filter_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_filter(bad)
    with pytest.raises(ValueError):
        TopicTrie().insert(bad, 1)


@pytest.mark.parametrize("good", ["#", "+", "a/+/b", "a/#", "/", "a//b", "$SYS/#", "+/+/#"])
def test_validate_filter_accepts(good: str) -> None:
    validate_filter(good)
