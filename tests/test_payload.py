"""Decoding inbound payloads per route format, and encoding outbound ones."""

from __future__ import annotations

import json

import pytest

from core.routing.payload import PayloadError, decode_payload, encode_payload


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"a": 1}', {"a": 1}),
        (b"[1, 2]", [1, 2]),
        (b'  \n{"a": [true, null]}', {"a": [True, None]}),
        (b"hello", "hello"),
        ("héllo".encode(), "héllo"),
        (b"42", "42"),  # JSON scalars stay text in auto mode
        (b'"quoted"', '"quoted"'),
        (b"", ""),
        (b"\xff\xfe\x00", b"\xff\xfe\x00"),
    ],
)
def test_auto_decoding(raw: bytes, expected: object) -> None:
    assert decode_payload(raw) == expected
    assert type(decode_payload(raw)) is type(expected)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2", b' {"a":}'])
def test_auto_rejects_broken_json(raw: bytes) -> None:
    with pytest.raises(PayloadError, match="invalid JSON"):
        decode_payload(raw)


def test_explicit_formats() -> None:
    assert decode_payload(b"42", "json") == 42
    assert decode_payload(b'"s"', "json") == "s"
    with pytest.raises(PayloadError, match="invalid JSON"):
        decode_payload(b"hello", "json")
    assert decode_payload(b'{"a":1}', "text") == '{"a":1}'
    with pytest.raises(PayloadError, match="UTF-8"):
        decode_payload(b"\xff", "text")
    assert decode_payload(b'{"a":1}', "bytes") == b'{"a":1}'


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"raw", b"raw"),
        (bytearray(b"ba"), b"ba"),
        (memoryview(b"mv"), b"mv"),
        ("text é", "text é".encode()),
        (None, b""),
        ({"a": [1, 2]}, b'{"a":[1,2]}'),
        ([1, "x"], b'[1,"x"]'),
        (7, b"7"),
        (True, b"true"),
    ],
)
def test_encoding(value: object, expected: bytes) -> None:
    assert encode_payload(value) == expected


def test_encoding_falls_back_to_str_for_unknown_types() -> None:
    import datetime

    when = datetime.datetime(2024, 1, 2, 3, 4, 5)
    assert json.loads(encode_payload({"at": when})) == {"at": str(when)}


def test_round_trip_of_json_objects() -> None:
    value = {"nested": {"list": [1, 2.5, "x", None]}, "ü": "ß"}
    assert decode_payload(encode_payload(value)) == value


@pytest.mark.parametrize("fmt", ["auto", "json"])
def test_json_nested_too_deeply_is_a_payload_error(fmt: str) -> None:
    # 100 KB, well under MAX_PAYLOAD_BYTES, but deeper than json's recursion limit.
    with pytest.raises(PayloadError, match="nested too deeply"):
        decode_payload(b"[" * 100_000, fmt)
