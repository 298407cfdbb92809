"""Files written whole or not at all, and one tensor at a time.

* :func:`atomic_write` (one file, whole or not at all) and :func:`file_digest`;
* :func:`write_safetensors`: the bytes ``safetensors.torch.save_file`` writes for the same
  tensors (its header, its order: by dtype, widest first, then by name), each tensor made
  only when its bytes are written (:class:`Pending`), so at most one is in memory;
* :func:`write_staged`: a set of files staged aside and moved in together.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["atomic_write", "file_digest", "Pending", "write_safetensors", "write_staged"]


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write(temporary path)``: a temporary name in the same
    folder, flushed to disk (fsync), then renamed over ``path`` (``os.replace``) and the
    folder synced. A crash or an error (a full disk) at any point leaves ``path`` as it was
    (absent, or its previous content), never half-written; the temporary is removed on an
    error."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial")
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


def file_digest(path: str | Path) -> str:
    """SHA-256 of the file at ``path``, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# safetensors' dtype names, in its order (a file holds its tensors in the reverse order).
_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.uint64: "U64",
}
_ORDER = {dtype: index for index, dtype in enumerate(_DTYPES)}


@dataclass(frozen=True)
class Pending:
    """A tensor of ``shape`` and ``dtype`` made by ``make()`` when it is needed."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def spec(value: torch.Tensor | Pending) -> Pending:
    """``value``'s shape and dtype (a tensor is its own maker)."""
    if isinstance(value, Pending):
        return value
    return Pending(tuple(value.shape), value.dtype, lambda: value)


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor | Pending], metadata: dict | None = None
) -> None:
    """Write ``tensors`` to ``path`` as ``safetensors.torch.save_file(tensors, path,
    metadata)`` would (same bytes), making and dropping one :class:`Pending` at a time."""
    specs = {name: spec(value) for name, value in tensors.items()}
    for name, entry in specs.items():
        if entry.dtype not in _DTYPES:
            raise TypeError(f"{name}: safetensors does not store {entry.dtype}")
    order = sorted(specs, key=lambda name: (-_ORDER[specs[name].dtype], name))
    header, offset = ({"__metadata__": metadata} if metadata else {}), 0
    for name in order:
        entry = specs[name]
        header[name] = {
            "dtype": _DTYPES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            entry = specs[name]
            value = entry.make().detach()
            if tuple(value.shape) != entry.shape or value.dtype != entry.dtype:
                raise ValueError(
                    f"{name}: made a {value.dtype} tensor of shape {tuple(value.shape)}, "
                    f"planned {entry.dtype} {entry.shape}"
                )
            flat = value.to("cpu").contiguous().reshape(-1)
            handle.write(flat.view(torch.uint8).numpy())
            del value, flat


def write_staged(folder: str | Path, writers: dict[str, Callable[[Path], None]]) -> Path:
    """Create ``folder`` (if missing) and write its files ``name`` by ``writers[name](path)``
    to hidden names beside them, made durable (fsync); then move all of them in. An error
    before the moves removes what was staged and leaves the folder's files as they were."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staged = {name: folder / f".{name}.partial" for name in writers}
    try:
        for name, write in writers.items():
            write(staged[name])
            with open(staged[name], "rb") as handle:
                os.fsync(handle.fileno())
    except BaseException:
        for partial in staged.values():
            partial.unlink(missing_ok=True)
        raise
    for name, partial in staged.items():
        os.replace(partial, folder / name)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return folder
