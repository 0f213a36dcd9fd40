"""The protobuf wire format by hand, in the two places protobuf's own API falls short.

- **Reading**: which string field of an unparseable request holds bad UTF-8.
  protobuf's parser only says "String field had bad UTF-8"; a client needs the
  field's name (and, for a repeated field, its index) to fix the request. This
  walks the top-level wire format of the raw bytes, which is all our request
  messages have (no nested string fields).
- **Writing**: a float32 array as a packed ``repeated float`` field is its
  little-endian bytes behind a tag and a length, so a reply's vectors are
  written with one ``tobytes`` each instead of a Python float per component
  (grpc_api/convert.py ``encoded_response``).
"""

from __future__ import annotations

import functools

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5


@functools.lru_cache(maxsize=1 << 16)
def varint(value: int) -> bytes:
    """A non-negative integer as a base-128 varint (cached: a reply's lengths and indices repeat)."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    """A field's tag: its number and wire type."""
    return varint(number << 3 | wire_type)


def varint_field(number: int, value: int) -> bytes:
    """An integer field; nothing for 0, which proto3 leaves out."""
    return key(number, VARINT) + varint(value) if value else b""


def header(number: int, length: int) -> bytes:
    """What goes before a length-delimited field's ``length`` bytes of payload: its tag and length."""
    return key(number, LENGTH_DELIMITED) + varint(length)


def length_delimited(number: int, payload: bytes) -> bytes:
    """A message, bytes or packed field; written even when empty (a set sub-message stays set)."""
    return header(number, len(payload)) + payload


def packed_floats(number: int, values: np.ndarray) -> bytes:
    """A ``repeated float`` field (packed, as proto3 writes it: little-endian float32); nothing when
    there are none."""
    raw = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return length_delimited(number, raw) if raw else b""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def bad_utf8_field(descriptor: Descriptor, data: bytes) -> tuple[str, int | None] | None:
    """The name (and, if repeated, the index) of the first string field whose bytes are not UTF-8."""
    counts: dict[int, int] = {}
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == VARINT:
                _, pos = _varint(data, pos)
                continue
            if wire_type in (FIXED64, FIXED32):
                pos += 8 if wire_type == FIXED64 else 4
                continue
            if wire_type != LENGTH_DELIMITED:
                return None
            size, pos = _varint(data, pos)
            payload, pos = data[pos : pos + size], pos + size
            field = descriptor.fields_by_number.get(number)
            index = counts.get(number, 0)
            counts[number] = index + 1
            if field is None or field.type != FieldDescriptor.TYPE_STRING:
                continue
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return field.name, (index if field.is_repeated else None)
    except ValueError:
        return None
    return None
