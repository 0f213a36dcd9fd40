"""Write a ``torch.save(module.state_dict())`` zip file from numpy arrays, without torch.

Synthetic bge-m3 directories need ``sparse_linear.pt`` / ``colbert_linear.pt`` of any
hidden size (the checked-in fixtures are torch-written but only 24 wide), and torch is
not a test dependency. This writes what torch 2.x writes: a stored (uncompressed) zip
whose ``<archive>/data.pkl`` is a protocol-2 pickle of an ``OrderedDict`` of
``torch._utils._rebuild_tensor_v2`` calls, each pointing through a persistent id at a
raw little-endian storage ``<archive>/data/<key>`` aligned to 64 bytes, plus torch's
small ``version`` / ``byteorder`` records. The pickle opcodes are written by hand
because the standard pickler must import ``torch`` to name its globals.
"""

from __future__ import annotations

import hashlib
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

#: numpy dtype -> the torch storage class torch.save names for it.
STORAGE_TYPES: dict[str, str] = {
    "float16": "HalfStorage",
    "float32": "FloatStorage",
    "float64": "DoubleStorage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "int16": "ShortStorage",
    "int8": "CharStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
}
ALIGNMENT = 64  # torch's PyTorchStreamWriter aligns every record's data to 64 bytes


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _unicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + struct.pack("<B", value)
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    return b"J" + struct.pack("<i", value)


def _tuple(values: tuple[int, ...]) -> bytes:
    items = b"".join(_int(v) for v in values)
    if len(values) == 0:
        return b")"
    if len(values) <= 3:
        return items + {1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(values)]
    return b"(" + items + b"t"


def _empty_ordered_dict() -> bytes:
    return _global("collections", "OrderedDict") + b")R"  # EMPTY_TUPLE, REDUCE


def state_dict_pickle(state: Mapping[str, np.ndarray]) -> tuple[bytes, list[bytes]]:
    """``data.pkl`` for ``state`` and the storages it refers to (storage key = list index)."""
    body = bytearray(b"\x80\x02" + _empty_ordered_dict() + b"(")  # PROTO 2, the dict, MARK
    storages: list[bytes] = []
    for key, value in state.items():
        array = np.asarray(value, order="C")  # (ascontiguousarray would make a 0-d tensor 1-d)
        dtype = array.dtype.newbyteorder("<")
        storage_type = STORAGE_TYPES[dtype.name]
        strides = tuple(int(np.prod(array.shape[i + 1 :], dtype=np.int64)) for i in range(array.ndim))
        persistent_id = (
            b"("
            + _unicode("storage")
            + _global("torch", storage_type)
            + _unicode(str(len(storages)))
            + _unicode("cpu")
            + _int(array.size)
            + b"tQ"  # TUPLE, BINPERSID
        )
        body += _unicode(key) + _global("torch._utils", "_rebuild_tensor_v2") + b"("
        body += persistent_id + _int(0) + _tuple(array.shape) + _tuple(strides)
        body += b"\x89" + _empty_ordered_dict() + b"tR"  # requires_grad=False, hooks; TUPLE, REDUCE
        storages.append(array.astype(dtype, copy=False).tobytes())
    body += b"u"  # SETITEMS
    # state_dict()'s _metadata attribute, set by BUILD: {"_metadata": {"": {"version": 1}}}
    body += b"}" + _unicode("_metadata") + _empty_ordered_dict()
    body += _unicode("") + b"}" + _unicode("version") + _int(1) + b"sssb."
    return bytes(body), storages


def save_state_dict(path: Path, state: Mapping[str, np.ndarray]) -> None:
    """``torch.save(state, path)`` for numpy arrays: the archive is named after the file's stem."""
    pickled, storages = state_dict_pickle(state)
    prefix = path.stem
    records: list[tuple[str, bytes]] = [
        ("data.pkl", pickled),
        (".format_version", b"1"),
        (".storage_alignment", str(ALIGNMENT).encode()),
        ("byteorder", b"little"),
        *((f"data/{index}", data) for index, data in enumerate(storages)),
        ("version", b"3\n"),
        (".data/serialization_id", hashlib.sha1(pickled + b"".join(storages)).hexdigest().encode()),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records:
            info = zipfile.ZipInfo(f"{prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            # Local header: 30 bytes + name + extra; pad the extra field ("FB" + length) so data aligns.
            data_start = handle.tell() + 30 + len(info.filename.encode()) + 4
            padding = -data_start % ALIGNMENT
            info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
            archive.writestr(info, data)
