"""paho-mqtt's MQTT 5 `Properties` with its tables built once: same checks, same results, faster.

paho (2.2.0) builds the name and type tables of every `Properties` object in `__init__` (27
entries, each type found with `list.index`), and every attribute it sets scans those tables
linearly, with a `str.replace` per entry. Every MQTT 5 PUBLISH the client receives is decoded
into one, which made property decoding about a quarter of the network thread's time.

`FastProperties` is a subclass with the tables as class attributes and dict lookups. It keeps
every check paho makes, in the same order and with the same exceptions: a property must be known
and allowed on the packet type, single-valued ones must not repeat, the ranges paho checks
(Receive Maximum, Topic Alias, Topic Alias Maximum, Maximum Packet Size, Subscription Identifier,
the 0/1 flags), strings must be UTF-8 without NUL or U+FEFF, lengths must fit what is left.
`install()` makes paho's packet decoders (`paho.mqtt._packet`) build these instead; nothing else
in paho changes. tests/test_mqtt_properties.py checks the decoders against paho's own classes on
random packets (hypothesis). The paho version is pinned exactly for this (requirements.txt).
"""

from __future__ import annotations

import struct
from typing import Any

import paho.mqtt._packet as paho_packet
from paho.mqtt.exception import MalformedPacket, MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers, readBytes, readUTF

_template = Properties(PacketTypes.PUBLISH)  # paho's own tables, read once
_NAMES: dict[str, int] = dict(_template.names)
_TYPES: list[str] = list(_template.types)
_PROPERTIES: dict[int, tuple[int, list[int]]] = dict(_template.properties)
_IDENT_BY_COMPRESSED = {name.replace(" ", ""): ident for name, ident in _NAMES.items()}
_COMPRESSED_BY_IDENT = {ident: name.replace(" ", "") for name, ident in _NAMES.items()}
_COMPRESSED = tuple(_IDENT_BY_COMPRESSED)  # in paho's order (pack, str, json iterate in it)
_MULTIPLE = frozenset(("SubscriptionIdentifier", "UserProperty"))
_PRIVATE = frozenset(("packetType", "types", "names", "properties"))
_RANGES: dict[str, tuple[int, int, str]] = {
    "ReceiveMaximum": (1, 65535, "range 1-65535"),
    "TopicAlias": (1, 65535, "range 1-65535"),
    "TopicAliasMaximum": (0, 65535, "range 0-65535"),
    "MaximumPacketSize": (1, 268435455, "range 1-268435455"),
    "SubscriptionIdentifier": (1, 268435455, "range 1-268435455"),
}
_FLAGS = frozenset(("RequestResponseInformation", "RequestProblemInformation", "PayloadFormatIndicator"))
_BYTE, _INT16, _INT32, _VBI, _BINARY, _UTF8, _PAIR = range(7)
assert _TYPES == ["Byte", "Two Byte Integer", "Four Byte Integer", "Variable Byte Integer", "Binary Data",
                  "UTF-8 Encoded String", "UTF-8 String Pair"], "paho's property types changed: check the pin"
_unpack_int16 = struct.Struct("!H").unpack
_unpack_int32 = struct.Struct("!L").unpack
_decode_vbi = VariableByteIntegers.decode


class FastProperties(Properties):
    """`paho.mqtt.properties.Properties`, with the lookups done in dicts built once."""

    names = _NAMES
    types = _TYPES
    properties = _PROPERTIES

    def __init__(self, packetType: int) -> None:
        object.__setattr__(self, "packetType", packetType)

    def allowsMultiple(self, compressedName: str) -> bool:
        return compressedName in _MULTIPLE

    def getIdentFromName(self, compressedName: str) -> int:
        return _IDENT_BY_COMPRESSED.get(compressedName, -1)

    def getNameFromIdent(self, identifier: int) -> str | None:
        for name, ident in _NAMES.items():  # not on the hot path; paho's result (the name with spaces)
            if ident == identifier:
                return name
        return None

    def __setattr__(self, name: str, value: Any) -> None:
        name = name.replace(" ", "")
        if name in _PRIVATE:
            object.__setattr__(self, name, value)
            return
        ident = _IDENT_BY_COMPRESSED.get(name)
        if ident is None:
            raise MQTTException(f"Property name must be one of {_NAMES.keys()}")
        if self.packetType not in _PROPERTIES[ident][1]:
            raise MQTTException(f"Property {name} does not apply to packet type {PacketTypes.Names[self.packetType]}")
        if not isinstance(value, list):
            bounds = _RANGES.get(name)
            if bounds is not None:
                low, high, text = bounds
                if value < low or value > high:
                    raise MQTTException(f"{name} property value must be in the {text}")
            elif name in _FLAGS and value != 0 and value != 1:
                raise MQTTException(f"{name} property value must be 0 or 1")
        if name in _MULTIPLE:
            if not isinstance(value, list):
                value = [value]
            if name in self.__dict__:
                value = self.__dict__[name] + value
        object.__setattr__(self, name, value)

    def __str__(self) -> str:
        present = self.__dict__
        return "[" + ", ".join(f"{name} : {present[name]}" for name in _COMPRESSED if name in present) + "]"

    def isEmpty(self) -> bool:
        present = self.__dict__
        return not any(name in present for name in _COMPRESSED)

    def clear(self) -> None:
        present = self.__dict__
        for name in _COMPRESSED:
            present.pop(name, None)

    def pack(self) -> bytes:
        present = self.__dict__
        buffer = b""
        for name in _COMPRESSED:
            if name in present:
                ident = _IDENT_BY_COMPRESSED[name]
                kind = _PROPERTIES[ident][0]
                values = present[name] if name in _MULTIPLE else [present[name]]
                for value in values:
                    buffer += self.writeProperty(ident, kind, value)
        return VariableByteIntegers.encode(len(buffer)) + buffer

    def readProperty(self, buffer: Any, type: int, propslen: int) -> tuple[Any, int]:
        if type == _BYTE:
            return buffer[0], 1
        if type == _INT16:
            return _unpack_int16(buffer[:2])[0], 2
        if type == _INT32:
            return _unpack_int32(buffer[:4])[0], 4
        if type == _VBI:
            return _decode_vbi(buffer)
        if type == _BINARY:
            return readBytes(buffer, propslen)
        if type == _UTF8:
            return _read_utf(buffer, propslen)
        if type == _PAIR:
            first, used = _read_utf(buffer, propslen)
            second, used2 = _read_utf(buffer[used:], propslen - used)
            return (first, second), used + used2
        raise MalformedPacket(f"unknown property type {type}")  # paho would fail on an unbound name

    def unpack(self, buffer: Any) -> tuple["FastProperties", int]:
        self.clear()
        present = self.__dict__
        propslen, used = _decode_vbi(buffer)
        buffer = buffer[used:]
        left = propslen
        while left > 0:
            ident, n = _decode_vbi(buffer)
            buffer = buffer[n:]
            left -= n
            kind = _PROPERTIES[ident][0]  # KeyError for an unknown identifier, as in paho (MalformedPacket)
            value, n = self.readProperty(buffer, kind, left)
            buffer = buffer[n:]
            left -= n
            name = _COMPRESSED_BY_IDENT[ident]
            if name not in _MULTIPLE and name in present:
                raise MQTTException(f"Property '{name}' must not exist more than once")
            self.__setattr__(name, value)
        return self, propslen + used


def _read_utf(buffer: Any, maxlen: int) -> tuple[str, int]:
    """paho's readUTF, with the character checks done by `in` instead of a loop per character."""
    if maxlen < 2:
        raise MalformedPacket("Not enough data to read string length")
    length = _unpack_int16(buffer[:2])[0]
    if length > maxlen - 2:
        raise MalformedPacket("Length delimited string too long")
    text = buffer[2:2 + length].decode("utf-8")  # strict UTF-8 already refuses D800-DFFF (ValueError)
    if "\x00" in text or "\ufeff" in text:
        return readUTF(buffer, maxlen)  # paho's own loop raises the error of whichever comes first
    return text, length + 2


_installed = False


def install() -> None:
    """Make paho's packet decoders build `FastProperties` (idempotent)."""
    global _installed
    if not _installed:
        paho_packet.Properties = FastProperties  # type: ignore[misc]
        _installed = True
