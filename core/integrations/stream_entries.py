"""How an MQTT message is kept in a stream entry (`encode_entry`) and read back (`decode_entry`)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from core.routing.context import MessageContext
from core.routing.payload import PayloadError
from core.foundation.tracing import TRACEPARENT, TRACESTATE, outgoing_pairs

def encode_entry(pattern: str, context: MessageContext, stream: str = "") -> dict[str, Any]:
    """The stream fields of one MQTT message: topic, params, payload, headers, route.

    The user properties are copied, with the trace headers of the current run (`core.foundation.tracing`) in
    place of the received ones, so the stream's handler continues the trace.
    """
    headers: dict[str, Any] = {"qos": context.qos, "retain": context.retain}
    props = context.properties
    user = outgoing_pairs(getattr(props, "UserProperty", None) if props is not None else None, stream)
    if user:
        headers["user_properties"] = [list(pair) for pair in user]
    if props is not None:
        response_topic = getattr(props, "ResponseTopic", None)
        if response_topic:
            headers["response_topic"] = response_topic
        correlation = getattr(props, "CorrelationData", None)
        if correlation is not None:
            headers["correlation_data"] = base64.b64encode(correlation).decode("ascii")
        content_type = getattr(props, "ContentType", None)
        if content_type:
            headers["content_type"] = content_type
    return {
        "topic": context.topic,
        "params": json.dumps(context.params, separators=(",", ":")),
        "payload": context.raw_payload,
        "headers": json.dumps(headers, separators=(",", ":")),
        "route": pattern,
    }


class StreamProperties:
    """The MQTT properties a bridged message carried, as `MessageContext.properties` expects them."""

    __slots__ = ("ResponseTopic", "CorrelationData", "UserProperty", "ContentType")

    def __init__(self, headers: dict[str, Any]) -> None:
        self.ResponseTopic: str | None = headers.get("response_topic")
        correlation = headers.get("correlation_data")
        self.CorrelationData: bytes | None = base64.b64decode(correlation) if correlation is not None else None
        self.UserProperty: list[tuple[str, str]] = [tuple(p) for p in headers.get("user_properties", ())]  # type: ignore[misc]
        self.ContentType: str | None = headers.get("content_type")


@dataclass(frozen=True)
class StreamMessage:
    """A stream entry, decoded: what a handler's context is built from."""

    topic: str
    params: dict[str, str]
    raw: bytes
    qos: int
    retain: bool
    properties: StreamProperties | None
    route: str | None  # pattern of the route that bridged it; None for entries written by others


def entry_text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def decode_entry(stream: str, fields: dict[Any, Any]) -> StreamMessage:
    """Decode the fields of an entry (bytes keys and values, as redis-py returns them)."""
    data = {entry_text(k): v for k, v in fields.items()}
    if "route" in data and "topic" in data:
        try:
            headers = json.loads(data.get("headers") or b"{}")
            params = json.loads(data.get("params") or b"{}")
        except ValueError as exc:
            raise PayloadError(f"entry has malformed params/headers: {exc}") from None
        raw = data.get("payload", b"")
        return StreamMessage(
            topic=entry_text(data["topic"]), params={str(k): str(v) for k, v in params.items()},
            raw=raw if isinstance(raw, bytes) else str(raw).encode(), qos=int(headers.get("qos", 0)),
            retain=bool(headers.get("retain", False)), properties=StreamProperties(headers), route=entry_text(data["route"]),
        )
    # Written by another system: its `payload` field, or all its fields as a JSON object.
    if "payload" in data:
        raw = data["payload"]
        raw = raw if isinstance(raw, bytes) else str(raw).encode()
    else:
        raw = json.dumps({k: entry_text(v) for k, v in data.items()}).encode()
    # `traceparent`/`tracestate` fields (the outbox's `tx.publish_stream` writes them) continue the trace.
    trace = [[key, entry_text(data[key])] for key in (TRACEPARENT, TRACESTATE) if key in data]
    return StreamMessage(stream, {}, raw, 0, False, StreamProperties({"user_properties": trace}) if trace else None, None)


@dataclass(frozen=True)
class StreamDelivery:
    """`context.state["stream"]` in a handler run by a stream consumer."""

    stream: str
    entry_id: str
    attempt: int  # 1 for the first delivery
