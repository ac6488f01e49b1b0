"""What `core.testing.client.TestClient` records and returns: publish results, published messages, handler calls,
dead letters and in-memory stream entries (plain data)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping


class TestClientError(AssertionError):
    """The test client could not finish a publish (a handler hung, or messages loop forever)."""

    __test__ = False


@dataclass(frozen=True)
class PublishedMessage:
    """A message published by the app (a handler, a response or a dead letter)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Mapping[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        return self.payload.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.payload)

    @property
    def user_properties(self) -> dict[str, str]:
        items = self.properties.get("user_properties") or ()
        return dict(items.items() if isinstance(items, Mapping) else items)

    @property
    def correlation_data(self) -> bytes | None:
        value = self.properties.get("correlation_data")
        return value if value is None or isinstance(value, bytes) else str(value).encode()


@dataclass(frozen=True)
class DeadLetterRecord:
    """A message the dispatcher sent to the dead-letter topic, with why."""

    topic: str  # the dead-letter topic it went to
    original_topic: str
    route: str  # the route pattern ("" when no route matched)
    error_type: str  # e.g. "PayloadError", "Timeout", "PayloadValidationError", or the exception's class name
    error: str
    payload: bytes  # the original payload
    attempts: int = 0  # handler calls made before it was dead-lettered (0: the handler never ran)


@dataclass(frozen=True)
class HandlerCall:
    """One run of a route's chain (middleware + handler) for one delivered copy."""

    route: str
    topic: str
    params: dict[str, str]
    payload: Any  # as the chain received it (decoded)
    result: Any = None
    error: BaseException | None = None  # asyncio.CancelledError when the route's timeout cancelled it

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class StreamEntry:
    """An entry appended to an in-memory stream (by a `stream=` route, or by `feed_stream`)."""

    stream: str
    id: str
    fields: Mapping[str, Any]  # as they would be stored in Redis (bridged entries: topic, params, payload, headers, route)


@dataclass(frozen=True)
class StreamDeadLetter:
    """An entry the stream consumer moved to `<stream>:dlq` (a DeadLetter, or out of retries)."""

    stream: str  # the dead-letter stream, `<stream>:dlq`
    original_stream: str
    entry_id: str
    route: str  # pattern of the route whose handler failed ("" when none matched)
    error_type: str
    error: str
    attempts: int
    fields: Mapping[str, Any]  # the original entry


@dataclass
class PublishResult:
    """What happened while one `publish()` was handled (including what the handlers caused)."""

    topic: str
    delivered_to: list[str]  # route patterns the published message itself was delivered to
    calls: list[HandlerCall]
    published: list[PublishedMessage]
    dead_letters: list[DeadLetterRecord]
    response_topic: str | None = None
    stream_dead_letters: list[StreamDeadLetter] = field(default_factory=list)

    @property
    def responses(self) -> list[PublishedMessage]:
        """Messages published to the response topic given to `publish()`."""
        if self.response_topic is None:
            return []
        return [m for m in self.published if m.topic == self.response_topic]

    @property
    def result(self) -> Any:
        """The return value of the handler, when exactly one route handled the published message."""
        own = [c for c in self.calls if c.topic == self.topic]
        if len(own) != 1:
            raise TestClientError(f"{len(own)} handler calls on {self.topic!r}; look at .calls instead")
        if own[0].error is not None:
            raise TestClientError(f"the handler of {own[0].route!r} failed: {own[0].error!r}")
        return own[0].result
