"""MQTT's rules for strings as Mosquitto applies them (see `core.transport.wire`), without the MQTT client.

Settings (`core.foundation.config`) and route patterns are checked with `string_problem` as well as what is
published, so these rules sit below the transport.
"""

from __future__ import annotations

import re

MAX_STRING_BYTES = 65535

# Every code point Mosquitto refuses in a string: controls, surrogates, non-characters.
_REFUSED = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff"
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(1, 17))
    + "]"
)
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ELLIPSIS = "\u2026"


def string_problem(text: object) -> str | None:
    """Why `text` cannot be an MQTT string (None if it can)."""
    if not isinstance(text, str):
        return f"must be a str, not {type(text).__name__}"
    if text.isascii() and text.isprintable() and len(text) <= MAX_STRING_BYTES:
        return None  # the usual case, ~10x faster than the search below (ASCII's only refused are controls)
    bad = _REFUSED.search(text)
    if bad is not None:
        char = bad.group()
        return f"contains {_describe(char)} at index {bad.start()}, which the broker refuses (escape or remove it)"
    if len(text) > MAX_STRING_BYTES // 4 and len(text.encode("utf-8")) > MAX_STRING_BYTES:
        return f"is {len(text.encode('utf-8'))} bytes long in UTF-8; MQTT allows at most {MAX_STRING_BYTES}"
    return None


def sanitize(text: str, budget: int = 1024) -> str:
    """`text` made safe to send: refused characters escaped (newline -> `\\n`, others as `\\xNN`,
    `\\uNNNN`), then cut on a character boundary to at most `budget` UTF-8 bytes (marked with '…')."""
    if _REFUSED.search(text) is not None:
        text = _REFUSED.sub(_escape, text)
    return truncate(text, budget)


def truncate(text: str, budget: int) -> str:
    """`text` cut to at most `budget` UTF-8 bytes on a character boundary, ending in '…' if cut."""
    if len(text) * 4 <= budget:
        return text
    data = text.encode("utf-8")
    if len(data) <= budget:
        return text
    room = max(0, budget - len(_ELLIPSIS.encode("utf-8")))
    return data[:room].decode("utf-8", "ignore") + _ELLIPSIS


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _describe(char: str) -> str:
    code = ord(char)
    if code <= 0x1F or 0x7F <= code <= 0x9F:
        kind = "the NUL character" if code == 0 else "a control character"
    elif 0xD800 <= code <= 0xDFFF:
        kind = "a lone surrogate (not valid UTF-8)"
    else:
        kind = "a Unicode non-character"
    return f"{kind} U+{code:04X}"


def shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
