"""`pytorch_model.bin` without torch, and without running any code from the file.

A PyTorch checkpoint is a pickle: a program for Python's pickle machine that may
call any importable function. This module reads one with a restricted unpickler
whose `find_class` hands out only a short allow-list of names, each mapped to a
function of this module that builds a numpy view description (never torch's own
code). Any other global (`os.system`, `builtins.eval`, a tensor subclass, ...) stops
the read with a `ModelFormatError` naming it, before anything is called.

Two layouts are read:

- the zip layout of `torch.save` since 1.6: `<prefix>/data.pkl` is the pickle and
  `<prefix>/data/<key>` holds each storage's raw little-endian bytes;
- the legacy stream (`_use_new_zipfile_serialization=False`): a magic number, a
  protocol number, a system-info dict, the pickle, the list of storage keys, then
  each storage as an int64 element count followed by its bytes.

Tensors come back as `TensorRef`s that read their storage only when loaded, so a
large checkpoint is never held in memory at once. float32/float16/float64 and the
integer types keep their dtype; bfloat16 (which numpy lacks) becomes float32 exactly.

Not yet: big-endian checkpoints, the pre-1.0 tar layout, quantized or sparse tensors
(all refused with a message saying so).
"""

from __future__ import annotations

import io
import logging
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from edgeslm.errors import ModelFormatError

log = logging.getLogger(__name__)

# torch's legacy storage classes -> numpy dtype of their elements.
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # raw bits; widened to float32 on load
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}

# What a truncated or garbled zip archive can make `zipfile` raise.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    EOFError,
    KeyError,
    ValueError,
    NotImplementedError,
    struct.error,
    zlib.error,
)

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Everything a truncated or garbled pickle can make the pickle machine raise.
_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    TypeError,
    ValueError,
    IndexError,
    KeyError,
    AttributeError,
    struct.error,
    UnicodeDecodeError,
    RecursionError,
)


@dataclass(frozen=True)
class _StorageType:
    """What `torch.FloatStorage` etc. unpickle to: just the element dtype."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _Storage:
    """One storage named by a persistent id: its key, element dtype and length."""

    key: str
    dtype: np.dtype
    numel: int
    bfloat16: bool


@dataclass(frozen=True)
class TensorRef:
    """A tensor of a checkpoint, read from its storage on `load()`.

    Attributes:
        shape: the tensor's size.
        dtype: numpy dtype `load()` returns (bfloat16 is returned as float32).
    """

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    reader: _StorageReader

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self.storage.bfloat16 else self.storage.dtype

    def load(self) -> np.ndarray:
        """The tensor as a new C-contiguous numpy array."""
        flat = self.reader.read(self.storage)
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.shape,
            strides=tuple(s * item for s in self.stride),
            writeable=False,
        )
        array = np.array(view, order="C")
        if self.storage.bfloat16:
            # bfloat16 is the top half of a float32: shift the bits into place.
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


class _StorageReader:
    """Reads one storage's bytes from a zip member or a legacy stream offset."""

    def __init__(self, path: Path, zip_prefix: str | None) -> None:
        self.path = path
        self.zip_prefix = zip_prefix
        self.legacy_offsets: dict[str, int] = {}

    def read(self, storage: _Storage) -> np.ndarray:
        size = storage.numel * storage.dtype.itemsize
        if self.zip_prefix is not None:
            name = f"{self.zip_prefix}data/{storage.key}"
            try:
                with zipfile.ZipFile(self.path) as archive:
                    raw = archive.read(name)
            except _ZIP_ERRORS as exc:
                raise ModelFormatError(
                    f"{self.path}: storage {storage.key} is missing or unreadable "
                    f"({exc}); the file is truncated or damaged: re-download it"
                ) from exc
        else:
            with open(self.path, "rb") as handle:
                handle.seek(self.legacy_offsets[storage.key])
                raw = handle.read(size)
        if len(raw) < size:
            raise ModelFormatError(
                f"{self.path}: storage {storage.key} holds {len(raw)} bytes, its "
                f"tensors need {size}; the file is truncated: re-download it"
            )
        return np.frombuffer(raw, dtype=storage.dtype, count=storage.numel)


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only knows how to rebuild tensors and ordered dicts."""

    def __init__(self, stream: BinaryIO, path: Path, reader: _StorageReader) -> None:
        super().__init__(stream)
        self.path = path
        self.reader = reader
        self.storages: dict[str, _Storage] = {}
        allowed = {
            ("collections", "OrderedDict"): OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        }
        for name, dtype in _STORAGE_DTYPES.items():
            allowed[("torch", name)] = _StorageType(name, dtype)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise ModelFormatError(
                f"{self.path}: refused to load: the pickle asks for {module}.{name}, "
                "which is not part of a tensor state dict. edgeslm never runs code "
                "from a checkpoint; if you trust the file, convert it to safetensors "
                "with PyTorch and export that"
            )
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise ModelFormatError(
                f"{self.path}: unexpected persistent id {str(pid)[:80]!r}; only "
                "tensor storages are supported"
            )
        kind, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(kind, _StorageType):
            raise ModelFormatError(
                f"{self.path}: storage {key} has type {kind!r}, not a torch storage"
            )
        if len(pid) == 6 and pid[5] is not None:
            # TODO: legacy storage views (torch < 0.4); no current checkpoint has them.
            raise ModelFormatError(f"{self.path}: storage views are not supported")
        if not isinstance(numel, int) or numel < 0:
            raise ModelFormatError(f"{self.path}: storage {key} has size {numel!r}")
        storage = _Storage(key, kind.dtype, numel, kind.name == "BFloat16Storage")
        known = self.storages.setdefault(key, storage)
        if known != storage:
            raise ModelFormatError(
                f"{self.path}: storage {key} is declared twice with different types"
            )
        return known

    def _rebuild_tensor(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        *_ignored: Any,
    ) -> TensorRef:
        """Checks a tensor's view of its storage and records it; reads nothing."""
        if not isinstance(storage, _Storage):
            raise ModelFormatError(f"{self.path}: a tensor without a storage")
        if not (
            _is_ints(size)
            and _is_ints(stride)
            and len(size) == len(stride)
            and isinstance(offset, int)
            and offset >= 0
            and all(d >= 0 for d in size)
            and all(s >= 0 for s in stride)
        ):
            raise ModelFormatError(
                f"{self.path}: tensor over storage {storage.key} has an invalid "
                f"view (offset {offset!r}, size {size!r}, stride {stride!r})"
            )
        if all(size):
            last = offset + sum((d - 1) * s for d, s in zip(size, stride, strict=True))
            if last >= storage.numel:
                raise ModelFormatError(
                    f"{self.path}: tensor of size {tuple(size)} reaches element "
                    f"{last} of storage {storage.key}, which has {storage.numel}"
                )
        return TensorRef(storage, offset, tuple(size), tuple(stride), self.reader)


def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    """An `nn.Parameter` is its tensor; gradients and hooks are dropped."""
    return data


def _is_ints(values: Any) -> bool:
    return isinstance(values, tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    )


def read_torch_checkpoint(path: str | Path) -> dict[str, TensorRef]:
    """Open a `pytorch_model.bin` and list its tensors without loading them.

    Args:
        path: a file written by `torch.save(state_dict)` (zip or legacy layout).

    Returns:
        Tensor name -> `TensorRef`, in the file's order. Entries of the state dict
        that are not tensors are dropped.

    Raises:
        ModelFormatError: not a PyTorch checkpoint, truncated or garbled, or the
            pickle references anything but tensors (the message names it).
    """
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK"):
        state = _read_zip(path)
    elif head[:1] == b"\x80":
        state = _read_legacy(path)
    else:
        raise ModelFormatError(
            f"{path}: not a PyTorch checkpoint (it starts with {head!r}, neither a "
            "zip archive nor a pickle)"
        )
    if not isinstance(state, dict):
        raise ModelFormatError(
            f"{path}: holds a {type(state).__name__}, expected a state dict of "
            "tensors (save model.state_dict(), not the model)"
        )
    tensors = {str(k): v for k, v in state.items() if isinstance(v, TensorRef)}
    log.debug("%s: %d tensors", path, len(tensors))
    return tensors


def load_torch_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a `pytorch_model.bin`, loaded (see `read_torch_checkpoint`)."""
    return {k: ref.load() for k, ref in read_torch_checkpoint(path).items()}


def _unpickle(
    stream: BinaryIO, path: Path, reader: _StorageReader
) -> tuple[Any, dict[str, _Storage]]:
    """Unpickle one object from the stream's position, leaving it just past it."""
    unpickler = _RestrictedUnpickler(stream, path, reader)
    try:
        return unpickler.load(), unpickler.storages
    except ModelFormatError:
        raise
    except _PICKLE_ERRORS as exc:
        raise ModelFormatError(
            f"{path}: the pickle is truncated or garbled ({type(exc).__name__}: "
            f"{exc}); re-download the file"
        ) from exc


def _read_zip(path: Path) -> Any:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
            if not pickles:
                raise ModelFormatError(
                    f"{path}: a zip archive without <name>/data.pkl; not a "
                    "checkpoint written by torch.save"
                )
            prefix = pickles[0][: -len("data.pkl")]
            order = f"{prefix}byteorder"
            if order in names and archive.read(order).strip() != b"little":
                # TODO: byte-swap big-endian checkpoints; no supported board is BE.
                raise ModelFormatError(f"{path}: big-endian checkpoints unsupported")
            data = archive.read(pickles[0])
    except _ZIP_ERRORS as exc:
        raise ModelFormatError(
            f"{path}: not a readable zip archive ({exc}); is it truncated? "
            "re-download it"
        ) from exc
    state, _ = _unpickle(io.BytesIO(data), path, _StorageReader(path, prefix))
    return state


def _read_legacy(path: Path) -> Any:
    """The pre-1.6 stream: magic, protocol, sys info, pickle, keys, storages."""
    reader = _StorageReader(path, None)
    with open(path, "rb") as stream:
        magic, _ = _unpickle(stream, path, reader)
        if magic != _LEGACY_MAGIC:
            raise ModelFormatError(
                f"{path}: a pickle, but not a PyTorch checkpoint (no torch.save "
                "magic number); edgeslm only reads tensor state dicts"
            )
        protocol, _ = _unpickle(stream, path, reader)
        sys_info, _ = _unpickle(stream, path, reader)
        if protocol != _LEGACY_PROTOCOL or not isinstance(sys_info, dict):
            raise ModelFormatError(f"{path}: unknown torch.save protocol {protocol!r}")
        if not sys_info.get("little_endian", True):
            raise ModelFormatError(f"{path}: big-endian checkpoints unsupported")
        state, storages = _unpickle(stream, path, reader)
        keys, _ = _unpickle(stream, path, reader)
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise ModelFormatError(f"{path}: the storage key list is garbled")

        # Each storage: int64 element count, then its bytes; note where they lie.
        size = path.stat().st_size
        for key in keys:
            head = stream.read(8)
            storage = storages.get(key)
            if storage is None or len(head) < 8:
                raise ModelFormatError(
                    f"{path}: storage {key} is missing or cut off; the file is "
                    "truncated: re-download it"
                )
            (numel,) = struct.unpack("<q", head)
            if numel != storage.numel:
                raise ModelFormatError(
                    f"{path}: storage {key} has {numel} elements, the pickle "
                    f"says {storage.numel}"
                )
            reader.legacy_offsets[key] = stream.tell()
            stream.seek(numel * storage.dtype.itemsize, io.SEEK_CUR)
        if stream.tell() > size or set(storages) - set(keys):
            raise ModelFormatError(
                f"{path}: storages are missing or cut off; the file is truncated: "
                "re-download it"
            )
    return state
