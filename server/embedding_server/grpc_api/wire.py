"""Finding which string field of an unparseable request holds bad UTF-8.

protobuf's parser only says "String field had bad UTF-8"; a client needs the
field's name (and, for a repeated field, its index) to fix the request. This
walks the top-level wire format of the raw bytes, which is all our request
messages have (no nested string fields).
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5


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
