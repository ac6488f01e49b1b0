"""core.transport.wire: what may go on the wire (issue 9, section 1), without a broker.

tests/integration/test_wire_broker.py checks the same rules against a real Mosquitto.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.router import Router
from core.testing import TestClient
from core.transport.wire import (MAX_STRING_BYTES, WireError, check_topic_name, publish_properties, sanitize, string_problem,
                       truncate)

# Any code point, surrogates included, with the troublesome ones made likely.
TROUBLE = ["\n", "\r", "\t", "\x00", "\x1f", "\x7f", "\x85", "\x9f", "\ud800", "\udfff", "\ufdd0", "\ufffe",
           "\uffff", "\U0001fffe", "\U0010ffff", "+", "#", "/", "\u2028", "é", "\U0001f600"]
any_char = st.one_of(st.characters(blacklist_categories=()), st.sampled_from(TROUBLE))
any_text = st.text(any_char, max_size=40)


@pytest.mark.parametrize("text, fragment", [
    ("a\nb", "control character U+000A at index 1"),
    ("\x00", "NUL character U+0000"),
    ("x\x85", "control character U+0085"),
    ("\x7f", "control character U+007F"),
    ("a\ud800", "lone surrogate"),
    ("\ufdd0", "non-character U+FDD0"),
    ("\U0002ffff", "non-character U+2FFFF"),
    ("é" * 32768, "65536 bytes long in UTF-8; MQTT allows at most 65535"),
    (b"bytes", "must be a str, not bytes"),
])
def test_string_problem_names_what_is_wrong(text: Any, fragment: str) -> None:
    problem = string_problem(text)
    assert problem is not None and fragment in problem


@pytest.mark.parametrize("text", ["", "plain", "a/b/c", "é\u2028\U0001f600", "$SYS", "\xa0", "a" * MAX_STRING_BYTES])
def test_valid_strings_pass(text: str) -> None:
    assert string_problem(text) is None


@pytest.mark.parametrize("topic, fragment", [
    ("", "is empty"), ("a/+/b", "wildcard"), ("a/#", "wildcard"), ("a\nb", "U+000A"), (None, "must be a str"),
])
def test_topic_names(topic: Any, fragment: str) -> None:
    with pytest.raises(WireError, match="topic") as info:
        check_topic_name(topic)
    assert fragment in str(info.value)


@pytest.mark.parametrize("properties, fragment", [
    ({"user_properties": {"error": "a\nb"}}, "value of user property 'error'"),
    ({"user_properties": [("k\x00", "v")]}, "user property name 'k\\x00'"),
    ({"response_topic": "replies/+"}, "publish property 'response_topic'"),
    ({"response_topic": "r\n"}, "publish property 'response_topic'"),
    ({"content_type": "text/plain\r\n"}, "publish property 'content_type'"),
    ({"correlation_data": b"x" * 65536}, "'correlation_data' is 65536 bytes"),
    ({"no_such_thing": 1}, "unknown publish property 'no_such_thing'"),
])
def test_publish_properties_refuses_with_the_property_named(properties: dict[str, Any], fragment: str) -> None:
    with pytest.raises(WireError) as info:
        publish_properties(properties)
    assert fragment in str(info.value)


def test_publish_properties_builds_paho_properties() -> None:
    props = publish_properties({"user_properties": {"a": 1}, "correlation_data": "id", "response_topic": "r/1",
                                "content_type": "application/json", "message_expiry": "5", "PayloadFormatIndicator": 1})
    assert props.UserProperty == [("a", "1")]
    assert (props.CorrelationData, props.ResponseTopic, props.ContentType) == (b"id", "r/1", "application/json")
    assert (props.MessageExpiryInterval, props.PayloadFormatIndicator) == (5, 1)


def test_sanitize_escapes_and_keeps_readable_text() -> None:
    assert sanitize("first line\nsecond line\r\n\tx \x00 \x85 \ud800 \U0001ffff") == \
        "first line\\nsecond line\\r\\n\\tx \\x00 \\x85 \\ud800 \\U0001ffff"
    assert sanitize("nothing to do: é ✓") == "nothing to do: é ✓"


def test_truncate_cuts_on_a_character_boundary() -> None:
    text = "ab" + "é" * 10  # é is 2 bytes
    cut = truncate(text, 8)
    assert cut == "abé\u2026"  # 2 + 2 + 3 bytes: one more é would not fit with the mark
    assert len(cut.encode()) <= 8
    assert truncate("short", 8) == "short"


@given(any_text, st.integers(min_value=3, max_value=200))
def test_sanitize_always_yields_a_valid_string_within_budget(text: str, budget: int) -> None:
    out = sanitize(text, budget)
    assert string_problem(out) is None
    assert len(out.encode("utf-8")) <= budget
    if string_problem(text) is None and len(text.encode("utf-8")) <= budget:
        assert out == text


@given(st.one_of(any_text, st.text(st.characters(max_codepoint=127))))
def test_string_problem_fast_path_agrees_with_the_full_check(text: str) -> None:
    refused = any(ord(c) <= 0x1F or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF or 0xFDD0 <= ord(c) <= 0xFDEF
                  or ord(c) & 0xFFFE == 0xFFFE for c in text)  # Mosquitto's rule, written out per code point
    assert (string_problem(text) is None) == (not refused)


@given(any_text)
def test_check_topic_name_agrees_with_string_problem(topic: str) -> None:
    try:
        check_topic_name(topic)
    except WireError:
        assert string_problem(topic) is not None or not topic or "+" in topic or "#" in topic
    else:
        assert string_problem(topic) is None and topic and "+" not in topic and "#" not in topic


# -- through the framework: any exception text, topic or user property from a handler ----------------


@settings(max_examples=150, deadline=None)
@given(error=any_text, error_type=any_text, topic=any_text, key=any_text, value=any_text)
async def test_what_a_handler_causes_goes_out_valid_or_raises_at_the_call(
        error: str, error_type: str, topic: str, key: str, value: str) -> None:
    """The handler publishes (any topic, any user property) and then raises (any text, any class name):
    its publish either raises WireError at the call or goes out with valid strings only, and the dead
    letter always does."""
    topic = "out/" + topic  # never back to the route under test
    outcome: dict[str, Any] = {}
    # Anything Python allows in a class name (no lone surrogate, no NUL).
    class_name = error_type.encode("utf-8", "replace").decode().replace("\x00", "?") or "E"
    failure = type(class_name, (Exception,), {})

    async def handler(context: Any) -> None:
        try:
            await context.publish(topic, "x", qos=1, properties={"user_properties": {key: value}})
            outcome["published"] = True
        except WireError:
            outcome["refused"] = True
        raise failure(error)

    router = Router()
    router.on("in/{n}", handler, qos=1)
    async with TestClient(router) as client:
        result = await client.publish("in/1", "payload", qos=1)
    assert outcome.get("published") != outcome.get("refused")
    valid = string_problem(topic) is None and "+" not in topic and "#" not in topic \
        and string_problem(key) is None and string_problem(value) is None
    assert bool(outcome.get("published")) == bool(valid)
    for message in result.published:
        check_topic_name(message.topic)
        publish_properties(message.properties)  # raises if anything invalid had been let through
    [dead] = result.dead_letters
    assert dead.error == sanitize(error)
