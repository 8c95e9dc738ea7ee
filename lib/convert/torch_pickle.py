"""Read PyTorch ``torch.save`` files into numpy, without torch and without running foreign code.

Both serializations torch has used are supported:

* the zip format (torch >= 1.6): ``<name>/data.pkl`` plus one raw file per storage;
* the legacy format: a stream of pickles (magic number, protocol, sys info, the object, the
  storage keys) followed by the raw storages.

Unpickling is restricted: only the globals a checkpoint needs (tensor rebuild functions, storage
types, ``OrderedDict``, ``argparse.Namespace`` and numpy scalars) can be loaded. Anything else, e.g.
a ``__reduce__`` that calls ``os.system`` or ``print``, raises :class:`UnsafeCheckpointError`
before it can run.
"""
from __future__ import annotations

import argparse
import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch storage class name -> numpy dtype (bfloat16 via ml_dtypes, which jax depends on).
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint asks to load a global that a plain weights file never needs."""


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class _Storage:
    """A storage whose bytes may arrive after the pickle (legacy format)."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype, self.numel, self.data = dtype, numel, None


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = _dtype(_STORAGE_DTYPES[name])


class _LazyTensor:
    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialize(self) -> np.ndarray:
        flat = self.storage.data
        if flat is None:
            raise pickle.UnpicklingError("checkpoint is truncated: a tensor's storage was never read")
        if not self.size:
            return flat[self.offset].copy()
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size, strides=[s * itemsize for s in self.stride])
        return np.array(view)  # own the memory, C-contiguous


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _allowed_globals() -> dict[tuple[str, str], Any]:
    from numpy._core import multiarray  # numpy >= 2; pickles name it numpy.core or numpy._core
    allowed = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("argparse", "Namespace"): argparse.Namespace,
        # numpy scalars appear in timm's 'metric' entry.
        ("numpy.core.multiarray", "scalar"): multiarray.scalar,
        ("numpy._core.multiarray", "scalar"): multiarray.scalar,
        ("numpy", "dtype"): np.dtype,
    }
    for name in _STORAGE_DTYPES:
        allowed[("torch", name)] = _StorageType(name)
    return allowed


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, persistent_load, source: str):
        super().__init__(file)
        self._persistent_load = persistent_load
        self._source = source

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # protocol-2 pickles written by Python 2 / old torch
            module = "builtins"
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._source}: refusing to load global '{module}.{name}'. A weights checkpoint only "
                f"needs tensors, storages, OrderedDict, argparse.Namespace and numpy scalars; this file "
                f"asks for more, so it was not unpickled (nothing in it was executed). If you trust the "
                f"file, load it with torch.load(..., weights_only=False) and pass the state_dict instead."
            ) from None

    def persistent_load(self, pid):
        return self._persistent_load(pid)


def _storage_type_from(obj) -> _StorageType:
    if isinstance(obj, _StorageType):
        return obj
    raise pickle.UnpicklingError(f"unsupported storage type in checkpoint: {obj!r}")


def _load_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise pickle.UnpicklingError(f"{path}: not a torch zip checkpoint (no single data.pkl)")
        root = pkl[0][: -len("data.pkl")]
        byteorder = zf.read(root + "byteorder").decode() if root + "byteorder" in names else "little"
        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
                raise pickle.UnpicklingError(f"{path}: unexpected persistent id {pid!r}")
            _, storage_type, key, _location, numel = pid[:5]
            if key not in storages:
                st = _storage_type_from(storage_type)
                raw = zf.read(f"{root}data/{key}")
                dt = st.dtype.newbyteorder("<" if byteorder == "little" else ">")
                s = _Storage(st.dtype, numel)
                s.data = np.frombuffer(raw, dtype=dt).astype(st.dtype, copy=False)
                storages[key] = s
            return storages[key]

        obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), persistent_load, str(path)).load()
    return _materialize(obj)


def _load_legacy(path: Path) -> Any:
    with open(path, "rb") as f:
        def plain_load():
            return _RestrictedUnpickler(f, lambda pid: None, str(path)).load()

        magic = plain_load()
        if magic != _LEGACY_MAGIC:
            raise pickle.UnpicklingError(f"{path}: not a torch checkpoint (bad magic number)")
        protocol = plain_load()
        if protocol != _LEGACY_PROTOCOL:
            raise pickle.UnpicklingError(f"{path}: unsupported legacy protocol {protocol}")
        plain_load()  # sys_info: endianness and type sizes
        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            kind = pid[0]
            if kind == "module":  # source code of pickled nn.Modules; never executed
                return None
            if kind != "storage":
                raise pickle.UnpicklingError(f"{path}: unexpected persistent id {pid!r}")
            storage_type, key, _location, numel, view_metadata = pid[1:6]
            if view_metadata is not None:
                raise pickle.UnpicklingError(f"{path}: storage views are not supported")
            if key not in storages:
                storages[key] = _Storage(_storage_type_from(storage_type).dtype, numel)
            return storages[key]

        obj = _RestrictedUnpickler(f, persistent_load, str(path)).load()
        keys = plain_load()
        for key in keys:
            s = storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            nbytes = numel * s.dtype.itemsize
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise pickle.UnpicklingError(f"{path}: truncated storage {key}")
            s.data = np.frombuffer(raw, dtype=s.dtype.newbyteorder("<")).astype(s.dtype, copy=False)
    return _materialize(obj)


def _materialize(obj: Any) -> Any:
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v)) for k, v in obj.items()) if isinstance(
            obj, collections.OrderedDict) else {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v) for v in obj)
    if isinstance(obj, argparse.Namespace):
        return argparse.Namespace(**{k: _materialize(v) for k, v in vars(obj).items()})
    return obj


def load_torch_file(path) -> Any:
    """Load a ``torch.save`` file (zip or legacy) into Python objects with numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    return _load_legacy(path)
