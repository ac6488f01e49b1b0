"""paho's callbacks into the MQTT client (network thread): connection state and its listeners, the
subscriptions after each connect, deliveries, publish acknowledgements. Part of `core.transport.mqtt_client.MqttClient`."""

from __future__ import annotations

import logging
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from core.transport.mqtt_network import close_gracefully, disable_nagle

log = logging.getLogger("core.mqtt")


class PublishError(RuntimeError):
    """The broker refused a publish, or the client could not queue it."""


class PahoCallbacks:
    """Mixin of `MqttClient`: the callbacks it registers with paho."""

    def _emit(self, event: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._emit_on_loop, event)
        except RuntimeError:
            pass  # loop closed during shutdown

    def _emit_on_loop(self, event: str) -> None:
        if event == "connected" and self._connected_event is not None:
            self._connected_event.set()
        elif event == "subscribed" and self._subscribed_event is not None:
            self._subscribed_event.set()
        elif event == "disconnected":
            if self._connected_event is not None:
                self._connected_event.clear()
            if self._subscribed_event is not None:
                self._subscribed_event.clear()
        for listener in self._state_listeners:
            try:
                listener(event)
            except Exception:
                log.exception("%s: state listener failed on %r", self._name, event)

    def _handle_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        if reason.is_failure:
            self.state.last_error = str(reason)
            log.error("%s: broker refused the connection: %s", self._name, reason)
            return
        self._generation += 1
        self.state.connected = True
        self._guard.connected()
        disable_nagle(client.socket())
        had_session = self._keeps_session and (self.state.connects > 0 or self.expect_session)
        self.state.connects += 1
        self.state.session_present = bool(flags.session_present)
        if self.v5 and properties is not None:
            available = getattr(properties, "SubscriptionIdentifierAvailable", 1)
            self.subscription_ids_available = bool(available)
        if had_session and not self.state.session_present:
            self.state.sessions_lost += 1
            log.warning(
                "%s: connected to %s:%s as %r, but the broker dropped the session this client had (restarted without "
                "saving it, or it expired): the messages queued in it for this client are lost; subscribing again",
                self._name, self.settings.broker_host, self.settings.broker_port, self.client_id,
            )
        else:
            self._info(
                "%s: connected to %s:%s as %r (%s session)", self._name, self.settings.broker_host,
                self.settings.broker_port, self.client_id, "resumed" if self.state.session_present else "new",
            )
        self._emit("connected")
        if self._notice_topic is not None:
            # This id is back: its notice (if the grace ran out meanwhile) no longer stands.
            client.publish(self._notice_topic, b"", qos=1, retain=True)
        self._subscribe_all()

    def _subscribe_all(self) -> None:
        self.state.subscribed = False
        self._pending_subacks.clear()
        if not self.subscriptions:
            self.state.subscribed = True
            self._emit("subscribed")
            return
        if self.v5:
            for sub in self.subscriptions:
                props = None
                if self.subscription_ids_available:
                    props = Properties(PacketTypes.SUBSCRIBE)
                    props.SubscriptionIdentifier = sub.subscription_id
                rc, mid = self._paho.subscribe(sub.topic, options=SubscribeOptions(qos=sub.qos), properties=props)
                if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
                    self._pending_subacks[mid] = [sub]
        else:
            rc, mid = self._paho.subscribe([(sub.topic, sub.qos) for sub in self.subscriptions])
            if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
                self._pending_subacks[mid] = list(self.subscriptions)

    def _handle_subscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Any) -> None:
        subs = self._pending_subacks.pop(mid, None)
        if subs is None:
            return
        for sub, code in zip(subs, reason_codes):
            if code.is_failure:
                log.error("%s: broker refused the subscription %r (qos %d): %s", self._name, sub.topic, sub.qos, code)
        if not self._pending_subacks:
            self.state.subscribed = True
            self._info("%s: subscribed to %d filter(s)", self._name, len(self.subscriptions))
            self._emit("subscribed")

    def _handle_unsubscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        fut = self._pending_unsubacks.pop(mid, None)
        if fut is not None:
            self._settle(fut, None)

    def _handle_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._closing:
            close_gracefully(sock, 2.0)

    def _handle_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        was_connected = self.state.connected
        if self._closing:
            self._stopping = True
        self.state.connected = False
        self.state.subscribed = False
        if was_connected:
            self.state.disconnects += 1
            if self._closing:
                self._info("%s: disconnected", self._name)
            else:
                log.warning("%s: disconnected from broker: %s", self._name, reason)
            self._emit("disconnected")

    def _handle_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._on_message(message, self._generation)

    def _handle_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
        if self._guard.probing:
            self._guard.acknowledged(mid)
        fut = self._pending_publishes.pop(mid, None)
        if fut is not None:
            failed = reason is not None and getattr(reason, "is_failure", False)
            self._settle(fut, PublishError(f"broker refused the publish: {reason}") if failed else None)

    def _give_up(self, messages: list[paho.MQTTMessage]) -> None:
        for message in messages:
            self.state.publishes_abandoned += 1
            log.error("%s: giving up on the publish to %r (mid %d): the broker closed the connection each time it was "
                      "sent (see the broker's log for why)", self._name, message.topic, message.mid)
            fut = self._pending_publishes.pop(message.mid, None)
            if fut is not None:
                self._settle(fut, PublishError(
                    f"publish to {message.topic!r} abandoned: the broker closed the connection each time it was sent"))
