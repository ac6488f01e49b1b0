"""What may go on the wire: MQTT's rules for strings, checked before a publish leaves the process.

An MQTT UTF-8 string must be valid UTF-8 of at most 65,535 bytes with no U+0000. Mosquitto
(checked on 2.0.11) is stricter and answers a PUBLISH that breaks its rules by closing the
connection: it also refuses the control characters U+0001-U+001F and U+007F-U+009F, UTF-16
surrogates and the non-characters U+FDD0-U+FDEF and U+xFFFE/U+xFFFF, in the topic and in every
string property (user properties, response topic, content type). A topic name must also be
non-empty and free of the wildcards `+` and `#`. Since paho resends an unacknowledged publish
after every reconnect, one such string would drop the connection again and again.

So: what the application passes to `publish` is checked here and refused at the call
(`WireError`), and text the framework makes up itself (error messages in dead letters) goes
through `sanitize`, which escapes what the broker refuses and cuts to a byte budget. The string
rules themselves are in `core.foundation.mqtt_text` (settings and route patterns are checked with them too).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MQTTException, Properties

from core.transport.mqtt_properties import FastProperties
from core.foundation.mqtt_text import MAX_STRING_BYTES, sanitize, shown, string_problem, truncate  # noqa: F401 - also imported from here

class WireError(ValueError):
    """A topic or property the broker would refuse; raised at the `publish` call, before sending."""


def check_string(text: object, what: str) -> None:
    """Raise `WireError` naming `what` if `text` is not a valid MQTT string."""
    problem = string_problem(text)
    if problem is not None:
        raise WireError(f"{what} {shown(text)} {problem}")


def check_topic_name(topic: object, what: str = "topic") -> None:
    """A topic one may publish to: a valid string, non-empty, without `+` or `#`."""
    if isinstance(topic, str) and topic and "+" not in topic and "#" not in topic:
        problem = string_problem(topic)
    elif not isinstance(topic, str):
        problem = f"must be a str, not {type(topic).__name__}"
    elif not topic:
        problem = "is empty"
    else:
        problem = "contains a wildcard ('+' or '#'); wildcards are for subscriptions, not for publishing"
    if problem is not None:
        raise WireError(f"{what} {shown(topic)} {problem}")


def publish_properties(properties: Mapping[str, Any]) -> Properties:
    """MQTT 5 PUBLISH properties from the friendly dict `publish(properties=...)` takes, checked.

    Keys: `user_properties` (a dict or (key, value) pairs; both become strings), `correlation_data`
    (bytes, or str encoded as UTF-8), `response_topic`, `content_type`, `message_expiry` (seconds),
    or a paho property name. None values are left out. Raises `WireError` naming the property.
    """
    props = FastProperties(PacketTypes.PUBLISH)  # paho's checks and encoding, several times faster
    for key, value in properties.items():
        if value is None:
            continue
        if key in ("user_properties", "UserProperty"):
            props.UserProperty = user_property_pairs(value)
        elif key in ("correlation_data", "CorrelationData"):
            data = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")
            if len(data) > MAX_STRING_BYTES:
                raise WireError(f"publish property {key!r} is {len(data)} bytes; MQTT allows at most {MAX_STRING_BYTES}")
            props.CorrelationData = data
        elif key in ("response_topic", "ResponseTopic"):
            check_topic_name(value, f"publish property {key!r}")
            props.ResponseTopic = value
        elif key in ("content_type", "ContentType"):
            check_string(value, f"publish property {key!r}")
            props.ContentType = value
        elif key == "message_expiry":
            props.MessageExpiryInterval = int(value)
        else:
            if isinstance(value, str):
                check_string(value, f"publish property {key!r}")
            try:
                setattr(props, key, value)
            except MQTTException as exc:
                raise WireError(
                    f"unknown publish property {key!r}: use user_properties, correlation_data, response_topic, "
                    f"content_type, message_expiry or a PUBLISH property name of paho ({exc})"
                ) from None
    return props


def user_property_pairs(value: Mapping[Any, Any] | Iterable[tuple[Any, Any]]) -> list[tuple[str, str]]:
    """User properties as checked (key, value) string pairs."""
    items = value.items() if isinstance(value, Mapping) else value
    pairs: list[tuple[str, str]] = []
    for item in items:
        key, val = item
        key, val = str(key), str(val)
        check_string(key, "user property name")
        check_string(val, f"value of user property {key!r}")
        pairs.append((key, val))
    return pairs


def encode_payload(value: Any) -> bytes:
    """bytes as-is, str as UTF-8, None as empty, anything else as JSON."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if value is None:
        return b""
    return json.dumps(value, separators=(",", ":"), default=str).encode("utf-8")
