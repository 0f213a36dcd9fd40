"""Read a PyTorch ``state_dict`` file (``torch.save`` zip format) without torch.

bge-m3 ships its sparse and ColBERT heads as ``sparse_linear.pt`` and
``colbert_linear.pt``. Importing torch for two small matrices would add a
gigabyte to the image, so this reads the zip directly: ``<archive>/data.pkl``
is a pickle whose tensors point at raw little-endian storages
``<archive>/data/<key>``. The unpickler is allow-listed: it builds numpy
arrays and an OrderedDict, and refuses any other global (a .pt file is a
pickle, and pickles can run code).
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError

_STORAGE_DTYPES: dict[str, str] = {
    "HalfStorage": "<f2",
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class _StorageType:
    """Stands in for ``torch.HalfStorage`` and friends: only the dtype matters."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


def _decode_storage(raw: bytes, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # numpy has no bfloat16: widen the top 16 bits to float32
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, dtype=dtype)


def _rebuild_tensor_v2(
    storage: np.ndarray,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> np.ndarray:
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view)  # a contiguous copy that owns its memory


def _rebuild_parameter(
    data: np.ndarray, requires_grad: bool = False, backward_hooks: Any = None
) -> np.ndarray:
    return data


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only tensors are allowed)")

    def persistent_load(self, pid: Any) -> np.ndarray:
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        raw = self._archive.read(f"{self._prefix}/data/{key}")
        return _decode_storage(raw, storage_type.dtype)


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a ``torch.save(module.state_dict())`` file, as float32/int numpy arrays."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if not pickles:
                raise ModelLoadError(f"{path}: not a torch.save zip file (no data.pkl)")
            prefix = pickles[0][: -len("/data.pkl")]
            with archive.open(pickles[0]) as handle:
                state = _StateDictUnpickler(handle, archive, prefix).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, KeyError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path}: cannot read torch weights ({exc})") from exc
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: expected a state_dict, found {type(state).__name__}")
    return {key: value for key, value in state.items() if isinstance(value, np.ndarray)}
