"""Decoding inbound payloads per route (`payload_format`); the encoding of outbound ones is the transport's
(`core.transport.wire.encode_payload`, importable from here too)."""

from __future__ import annotations

import json
from typing import Any

from core.transport.wire import encode_payload  # noqa: F401 - also imported from here

PAYLOAD_FORMATS = ("auto", "json", "text", "bytes")

_json_loads = json.loads
_JSON_START = frozenset(b"{[")


class PayloadError(ValueError):
    """The payload cannot be decoded the way the route asks for."""


def decode_payload(raw: bytes, fmt: str = "auto") -> Any:
    """`auto`: a JSON object or array becomes dict/list, UTF-8 text str, anything else bytes.

    In `auto`, a payload that starts like a JSON object/array but does not parse is an error
    (dead-lettered) rather than silently handed over as text.
    """
    if fmt == "auto":
        if not raw:
            return ""
        first = raw[0]
        if first in _JSON_START or (first in b" \t\r\n" and raw.lstrip()[:1] in (b"{", b"[")):
            return _decode_json(raw)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
    if fmt == "json":
        return _decode_json(raw)
    if fmt == "text":
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(f"payload is not UTF-8 text: {exc}") from None
    return raw


def _decode_json(raw: bytes) -> Any:
    try:
        return _json_loads(raw)
    except ValueError as exc:
        raise PayloadError(f"invalid JSON: {exc}") from None
    except RecursionError:
        # `[[[[...` a few thousand levels deep: json gives up before MAX_PAYLOAD_BYTES does.
        raise PayloadError("invalid JSON: nested too deeply") from None
