"""Files written whole or not at all: :func:`atomic_write` and :func:`file_digest`."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "file_digest"]


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
