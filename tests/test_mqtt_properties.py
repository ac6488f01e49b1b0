"""core.transport.mqtt_properties.FastProperties decodes, checks and encodes exactly as paho's Properties does.

Random packets (hypothesis) go through paho's own decoders twice, once building paho's
`Properties` and once `FastProperties`: both must refuse the same packets (MalformedPacket) and
give equal results for the rest. Setting and packing properties is compared the same way.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

import paho.mqtt._packet as paho_packet
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket, MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

from core.transport.mqtt_properties import FastProperties

PAHO_IDENTS = sorted(Properties(PacketTypes.PUBLISH).properties)
PACKET_TYPES = [t for t in range(1, 16)] + [PacketTypes.WILLMESSAGE]
V5, V311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311


def props_state(props: Any) -> Any:
    if props is None:
        return None
    if not isinstance(props, Properties):
        return props
    tables = ("packetType", "types", "names", "properties")  # paho keeps its tables per object
    return props.packetType, {k: v for k, v in vars(props).items() if k not in tables}, str(props), props.json()


def normalise(result: Any) -> Any:
    if isinstance(result, tuple) and hasattr(result, "_fields"):
        return tuple(props_state(v) if isinstance(v, Properties) else v for v in result)
    return props_state(result)


def outcome(fn: Callable[[], Any], cls: type) -> Any:
    saved = paho_packet.Properties
    paho_packet.Properties = cls  # type: ignore[misc]
    try:
        return "ok", normalise(fn())
    except MalformedPacket:
        return "malformed", None
    except MQTTException:
        return "mqtt-exception", None
    finally:
        paho_packet.Properties = saved  # type: ignore[misc]


def same(fn: Callable[[], Any]) -> Any:
    expected = outcome(fn, Properties)
    assert outcome(fn, FastProperties) == expected
    return expected


# -- random property sections ------------------------------------------------------------------------

utf8_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


def _utf(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


property_value = st.one_of(
    st.binary(max_size=6),  # garbage of any length
    st.integers(0, 255).map(lambda v: bytes([v])),
    st.integers(0, 65535).map(lambda v: struct.pack("!H", v)),
    st.integers(0, 2**32 - 1).map(lambda v: struct.pack("!L", v)),
    st.integers(0, 268435455).map(VariableByteIntegers.encode),
    utf8_text.map(lambda s: _utf(s.encode())),
    st.sampled_from(["\x00", "a\ufeffb", "x\x00\ufeff", "ok"]).map(lambda s: _utf(s.encode())),
    st.binary(max_size=5).map(_utf),  # maybe invalid UTF-8
    st.tuples(utf8_text, utf8_text).map(lambda kv: _utf(kv[0].encode()) + _utf(kv[1].encode())),
)
identifier = st.one_of(st.sampled_from(PAHO_IDENTS), st.integers(0, 200))
PAHO_TYPES = {ident: kind for ident, (kind, _) in Properties(PacketTypes.PUBLISH).properties.items()}
value_of_type = {
    0: st.integers(0, 3).map(lambda v: bytes([v])),
    1: st.sampled_from([0, 1, 2, 65535]).map(lambda v: struct.pack("!H", v)),
    2: st.integers(0, 2**32 - 1).map(lambda v: struct.pack("!L", v)),
    3: st.sampled_from([0, 1, 127, 128, 16384, 268435455]).map(VariableByteIntegers.encode),
    4: st.binary(max_size=6).map(_utf),
    5: utf8_text.map(lambda s: _utf(s.encode())),
    6: st.tuples(utf8_text, utf8_text).map(lambda kv: _utf(kv[0].encode()) + _utf(kv[1].encode())),
}


@st.composite
def one_property(draw: st.DrawFn) -> bytes:
    """Mostly well-formed (a known identifier with a value of its type), sometimes anything."""
    if draw(st.integers(0, 4)) == 0:
        return VariableByteIntegers.encode(draw(identifier)) + draw(property_value)
    ident = draw(st.sampled_from([1, 2, 3, 8, 9, 11, 35, 38] if draw(st.booleans()) else PAHO_IDENTS))
    return VariableByteIntegers.encode(ident) + draw(value_of_type[PAHO_TYPES[ident]])


@st.composite
def property_section(draw: st.DrawFn) -> bytes:
    body = b"".join(draw(one_property()) for _ in range(draw(st.integers(0, 4))))
    declared = len(body) if draw(st.integers(0, 4)) else draw(st.integers(0, len(body) + 4))
    return VariableByteIntegers.encode(declared) + body


@st.composite
def publish_packet(draw: st.DrawFn) -> tuple[int, bytes]:
    qos = draw(st.integers(0, 3))
    header = 0x30 | (qos << 1) | draw(st.integers(0, 1)) | (draw(st.integers(0, 1)) << 3)
    topic = draw(st.binary(max_size=8))
    packet = struct.pack("!H", len(topic)) + topic
    if qos:
        packet += struct.pack("!H", draw(st.integers(0, 65535)))
    packet += draw(property_section()) + draw(st.binary(max_size=8))
    if draw(st.integers(0, 3)) == 0:
        packet = packet[:draw(st.integers(0, len(packet)))]  # truncated
    return header, packet


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(publish_packet())
def test_publish_packets_decode_alike(packet: tuple[int, bytes]) -> None:
    header, body = packet
    same(lambda: paho_packet.decode_publish(header, body, V5))
    same(lambda: paho_packet.decode_publish(header, body, V311))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=40))
def test_random_bytes_decode_alike(header: int, body: bytes) -> None:
    same(lambda: paho_packet.decode_publish(header, body, V5))


ACK_DECODERS = [paho_packet.decode_puback, paho_packet.decode_pubrec, paho_packet.decode_pubrel,
                paho_packet.decode_pubcomp]


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(["connack", "suback", "unsuback", "disconnect", "ack"]), st.integers(0, 3),
       st.integers(0, 65535), st.integers(0, 255), property_section(), st.binary(max_size=4), st.booleans())
def test_other_packets_decode_alike(kind: str, which: int, mid: int, code: int, props: bytes, tail: bytes,
                                    truncate: bool) -> None:
    if kind == "connack":
        header, body = 0x20, bytes([mid & 1, code]) + props
        decode: Callable[..., Any] = paho_packet.decode_connack
    elif kind == "disconnect":
        header, body, decode = 0xE0, bytes([code]) + props, paho_packet.decode_disconnect
    elif kind == "ack":
        header, body, decode = 0x40, struct.pack("!HB", mid, code) + props, ACK_DECODERS[which]
    else:
        header = 0x90 if kind == "suback" else 0xB0
        body = struct.pack("!H", mid) + props + bytes([code])
        decode = paho_packet.decode_suback if kind == "suback" else paho_packet.decode_unsuback
    body += tail
    if truncate:
        body = body[:len(body) // 2]
    same(lambda: decode(header, body, V5))


# -- setting and packing ------------------------------------------------------------------------------

NAMES = [name.replace(" ", "") for name in Properties(PacketTypes.PUBLISH).names] + ["Unknown", "Receive Maximum"]
edge_values = st.one_of(st.sampled_from([-1, 0, 1, 2, 65535, 65536, 268435455, 268435456]), utf8_text,
                        st.tuples(utf8_text, utf8_text), st.lists(st.integers(1, 300), max_size=2))


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(PACKET_TYPES), st.lists(st.tuples(st.sampled_from(NAMES), edge_values), max_size=4))
def test_setting_properties_checks_alike(packet_type: int, assignments: list[tuple[str, Any]]) -> None:
    def build(cls: type) -> Any:
        props = cls(packet_type)
        results = []
        for name, value in assignments:
            try:
                setattr(props, name, value)
                results.append("ok")
            except MQTTException as exc:
                results.append(str(exc))
            except (TypeError, IndexError) as exc:  # e.g. paho naming the will's pseudo packet type
                results.append(type(exc).__name__)
        try:
            packed: Any = props.pack()
        except Exception as exc:  # noqa: BLE001 - the same failure is expected of both
            packed = type(exc).__name__
        return results, props_state(props), packed, props.isEmpty()

    assert build(FastProperties) == build(Properties)


def test_tables_are_paho_s() -> None:
    fast, paho = FastProperties(PacketTypes.CONNACK), Properties(PacketTypes.CONNACK)
    assert fast.names == paho.names and fast.types == paho.types and fast.properties == paho.properties
    for name in paho.names:
        compressed = name.replace(" ", "")
        assert fast.getIdentFromName(compressed) == paho.getIdentFromName(compressed)
        assert fast.allowsMultiple(compressed) == paho.allowsMultiple(compressed)
        assert fast.getNameFromIdent(paho.names[name]) == paho.getNameFromIdent(paho.names[name])


def test_a_subscription_identifier_publish_decodes_to_fast_properties_once_installed() -> None:
    from core.transport.mqtt_properties import install

    props = Properties(PacketTypes.PUBLISH)
    props.SubscriptionIdentifier = 7
    body = struct.pack("!H", 3) + b"a/b" + struct.pack("!H", 9) + props.pack() + b"{}"
    install()
    result = paho_packet.decode_publish(0x32, body, V5)
    assert isinstance(result.properties, FastProperties)
    assert result.properties.SubscriptionIdentifier == [7] and result.payload == b"{}" and result.mid == 9


@pytest.mark.parametrize("value", [0, 268435456])
def test_a_subscription_identifier_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(MQTTException):
        FastProperties(PacketTypes.PUBLISH).SubscriptionIdentifier = value
