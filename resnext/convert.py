"""Read PyTorch ``.pth`` state_dicts without PyTorch, and without running pickled code.

    python -m resnext.convert resnext50_32x4d-7cdf4587.pth resnext50_32x4d.npz

A ``torch.save`` file (PyTorch >= 1.6) is a zip archive:
    <name>/data.pkl        the pickled object (here: a dict of tensors)
    <name>/data/<key>      raw little-endian bytes of storage <key>
    <name>/byteorder       "little" or "big" (absent in old files: little)
    <name>/version, ...    format records we do not need
Each tensor is pickled as a call ``torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)`` where the storage is a "persistent id"
``('storage', torch.FloatStorage, key, location, numel)``.

A pickle can name any importable function and call it, so loading one is
running code. ``_StateDictUnpickler.find_class`` therefore answers only the
handful of names a state_dict uses, each mapped to a local numpy function, and
refuses everything else before anything is called.
"""
import argparse
import collections
import os
import pickle
import sys
import zipfile
import zlib

import numpy as np


class ConvertError(ValueError):
    """A file that is not a state_dict we can read; the message is one line."""


# torch storage class -> numpy dtype of its elements ("bfloat16": no numpy dtype).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
# torch dtype names (pickled as globals, e.g. by _rebuild_tensor_v3) -> numpy dtype.
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": "bfloat16",
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16, "int8": np.int8, "uint8": np.uint8,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
    "complex64": np.complex64, "complex128": np.complex128,
}


class _DType:
    """What ``torch.<dtype>`` or ``torch.<X>Storage`` unpickles to here: just a dtype."""

    def __init__(self, np_dtype):
        self.np_dtype = np_dtype


def _element_dtype(np_dtype, byteorder):
    """numpy dtype to read raw storage bytes with (bfloat16 is read as its uint16 bits)."""
    dtype = np.dtype(np.uint16 if np_dtype == "bfloat16" else np_dtype)
    return dtype.newbyteorder("<" if byteorder == "little" else ">")


def _bfloat16_to_float32(bits):
    """bfloat16 is the upper half of a float32: shift the 16 bits into place."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles the data.pkl of a torch zip file into numpy arrays, refusing any other code."""

    def __init__(self, archive, prefix, source):
        super().__init__(archive.open(prefix + "data.pkl"))
        self.archive, self.prefix, self.source = archive, prefix, source
        names = set(archive.namelist())
        order = prefix + "byteorder"
        self.byteorder = archive.read(order).decode().strip() if order in names else "little"
        if self.byteorder not in ("little", "big"):
            raise ConvertError(f"{source}: unknown byteorder record {self.byteorder!r}")
        self.storages = {}  # key -> 1-D numpy array of the storage's elements

    def find_class(self, module, name):
        allowed = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter_with_state,
            ("torch", "Size"): tuple,
        }
        if (module, name) in allowed:
            return allowed[module, name]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _DType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _DType(_TORCH_DTYPES[name])
        raise ConvertError(f"{self.source}: refusing to load '{module}.{name}': only tensors "
                           f"and dicts of tensors are allowed (is this file from a trusted source?)")

    def persistent_load(self, pid):
        """('storage', storage type, key, location, numel) -> 1-D array of that storage."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _DType)):
            raise ConvertError(f"{self.source}: unexpected persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid
        if key not in self.storages:
            record = f"{self.prefix}data/{key}"
            try:
                raw = self.archive.read(record)
            except KeyError:
                raise ConvertError(f"{self.source}: storage record {record} is missing") from None
            dtype = _element_dtype(kind.np_dtype, self.byteorder)
            if len(raw) < numel * dtype.itemsize:
                raise ConvertError(f"{self.source}: storage {key} has {len(raw)} bytes, "
                                   f"expected {numel * dtype.itemsize}")
            self.storages[key] = (np.frombuffer(raw, dtype, count=numel), kind.np_dtype)
        return self.storages[key]

    def _tensor(self, storage, offset, size, stride, np_dtype=None):
        """Gather a strided view of a storage into a new C-contiguous array."""
        elements, storage_dtype = storage
        np_dtype = storage_dtype if np_dtype is None else np_dtype
        if np_dtype != storage_dtype:  # v3 tensors come with untyped (byte) storages
            # (the offset already counts elements of the tensor's dtype)
            elements = elements.view(_element_dtype(np_dtype, self.byteorder))
        size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
        if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
            raise ConvertError(f"{self.source}: bad tensor geometry size={size} stride={stride}")
        if 0 in size:
            out = np.empty(size, elements.dtype)
        else:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if offset < 0 or last >= len(elements):
                raise ConvertError(f"{self.source}: tensor (size={size}, stride={stride}, "
                                   f"offset={offset}) reads past its storage of {len(elements)}")
            item = elements.itemsize
            view = np.lib.stride_tricks.as_strided(
                elements[offset:], shape=size, strides=[s * item for s in stride], writeable=False)
            out = np.array(view, order="C")
        out = out.astype(out.dtype.newbyteorder("="), copy=False)  # native byte order
        return _bfloat16_to_float32(out) if np_dtype == "bfloat16" else out

    def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False,
                           backward_hooks=None, metadata=None):
        return self._tensor(storage, offset, size, stride)

    def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, backward_hooks,
                           dtype, metadata=None):
        if not isinstance(dtype, _DType):
            raise ConvertError(f"{self.source}: unsupported tensor dtype {dtype!r:.40}")
        return self._tensor(storage, offset, size, stride, dtype.np_dtype)

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None):
        return data

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        return data


def load_pth(path):
    """The object stored in a torch zip file, with every tensor as a numpy array."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConvertError(f"file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ConvertError(f"{path} is not a PyTorch zip checkpoint (files from torch < 1.6 "
                           f"use a legacy format: load and re-save them with a newer torch)")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist()
                       if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise ConvertError(f"{path}: expected one <name>/data.pkl record, "
                                   f"found {len(pickles)}")
            unpickler = _StateDictUnpickler(archive, pickles[0][:-len("data.pkl")], path)
            try:
                return unpickler.load()
            except ConvertError:
                raise
            except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as e:
                raise ConvertError(f"{path}: damaged or unsupported pickle "
                                   f"({type(e).__name__}: {e})") from None
    except (zipfile.BadZipFile, zlib.error) as e:  # a bad CRC, a truncated record, ...
        raise ConvertError(f"{path}: damaged zip archive ({type(e).__name__}: {e})") from None


def _state_dict_of(obj, source):
    """The name -> array dict inside a loaded checkpoint (a bare state_dict, or one
    stored under 'state_dict' / 'model' as training scripts often do)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(v, np.ndarray) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        if isinstance(obj, dict) and obj:
            bad = next(k for k, v in obj.items() if not isinstance(v, np.ndarray))
            raise ConvertError(f"{source}: entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor; "
                               f"expected a state_dict")
    raise ConvertError(f"{source}: holds a {type(obj).__name__}, not a state_dict of tensors")


def load_weights(path):
    """name -> numpy array from a ``.npz`` (as written by this tool) or a PyTorch ``.pth``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConvertError(f"weights file not found: {path}")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ConvertError(f"{path}: not a readable .npz ({e})") from None
    return _state_dict_of(load_pth(path), path)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m resnext.convert",
        description="Convert a PyTorch .pth state_dict to a NumPy .npz (no PyTorch needed).")
    parser.add_argument("input", help="PyTorch checkpoint (.pth / .pt, zip format)")
    parser.add_argument("output", help="where to write the .npz")
    args = parser.parse_args(argv)
    try:
        arrays = _state_dict_of(load_pth(args.input), args.input)
        out_dir = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(out_dir):
            raise ConvertError(f"output folder does not exist: {out_dir}")
        with open(args.output, "wb") as f:  # a file object: np.savez would append ".npz"
            np.savez(f, **arrays)
    except (ConvertError, OSError) as e:
        sys.exit(f"convert: error: {e}")
    total = sum(a.nbytes for a in arrays.values())
    print(f"wrote {len(arrays)} arrays ({total / 2**20:.1f} MiB) to {args.output}")


if __name__ == "__main__":
    main()
