"""What a handler (or middleware) can ask for about the message it is handling."""

from __future__ import annotations

from typing import Any, AsyncContextManager, Callable, Protocol


class Publisher(Protocol):
    """Publishing as handlers see it (implemented by `core.transport.mqtt_client.MqttClient` and the test client)."""

    async def publish(
        self,
        topic: str,
        payload: Any = None,
        qos: int = 0,
        retain: bool = False,
        *,
        properties: dict[str, Any] | None = None,
    ) -> None: ...


class Services:
    """Per-process services a context can reach; later features (outbox, streams) plug in here.

    One instance per process, built after the process starts (never shared across processes).
    """

    __slots__ = ("publisher", "transaction_factory", "worker_id", "extras")

    def __init__(self, publisher: Publisher, worker_id: str = "main") -> None:
        self.publisher = publisher
        self.worker_id = worker_id
        self.transaction_factory: Callable[["MessageContext"], AsyncContextManager[Any]] | None = None
        self.extras: dict[str, Any] = {}


class MessageContext:
    """One message on its way through middleware to a handler.

    `payload` is the decoded payload (dict/list for JSON, str for UTF-8 text, else bytes) and may
    be replaced by middleware; `raw_payload` is what the broker sent. `state` is a scratch dict
    for middleware.
    """

    __slots__ = (
        "topic", "params", "payload", "raw_payload", "qos", "retain", "dup", "properties",
        "route", "services", "_state",
    )

    def __init__(
        self,
        topic: str,
        params: dict[str, str],
        payload: Any,
        raw_payload: bytes,
        qos: int,
        retain: bool,
        dup: bool,
        properties: Any,
        route: Any,  # its core.routing.router.Route (not imported: the router's modules import this one)
        services: Services,
    ) -> None:
        self.topic = topic
        self.params = params
        self.payload = payload
        self.raw_payload = raw_payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.properties = properties
        self.route = route
        self.services = services
        self._state: dict[str, Any] | None = None

    @property
    def state(self) -> dict[str, Any]:
        if self._state is None:
            self._state = {}
        return self._state

    @property
    def client(self) -> Publisher:
        return self.services.publisher

    @property
    def worker_id(self) -> str:
        return self.services.worker_id

    @property
    def response_topic(self) -> str | None:
        return getattr(self.properties, "ResponseTopic", None) if self.properties is not None else None

    @property
    def correlation_data(self) -> bytes | None:
        return getattr(self.properties, "CorrelationData", None) if self.properties is not None else None

    @property
    def user_properties(self) -> list[tuple[str, str]]:
        if self.properties is None:
            return []
        return list(getattr(self.properties, "UserProperty", None) or [])

    async def publish(self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False, **kwargs: Any) -> None:
        """Publish through this process's client; with qos>0 it returns once the broker acknowledged."""
        await self.services.publisher.publish(topic, payload, qos, retain, **kwargs)

    def transaction(self) -> AsyncContextManager[Any]:
        """A unit of work (database session + outbox) — available when a database is configured."""
        factory = self.services.transaction_factory
        if factory is None:
            raise RuntimeError(
                f"route {self.route.pattern!r}: context.transaction() needs a database; set DATABASE_URL "
                "(see README, 'Transactional outbox')"
            )
        return factory(self)

    def __repr__(self) -> str:
        return f"<MessageContext topic={self.topic!r} route={self.route.pattern!r}>"
