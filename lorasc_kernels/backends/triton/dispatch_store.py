"""The GEMM dispatch's measured choices kept on disk, so every process (every rank, every
run) of one kind of GPU and one software stack runs the same variant for the same problem.

One JSON file per GPU model and version stack (torch, Triton, this package: a new kernel or
compiler may change which variant wins), in :data:`DIR_SWITCH`'s folder (default
``~/.cache/lorasc_kernels/dispatch``; an empty value keeps the choices in memory only)::

    {"format": 1, "choices": {"<problem label>": "persistent", ...}}

A process that misses a problem in memory reads the file first and adopts what is there; it
measures only a problem nobody stored, then merges its choice into the file under an
exclusive lock (``fcntl``; without it, on a platform that lacks it, the last writer wins)
and adopts whatever the file holds for that problem by then: two processes that measured at
once end up with the first one's choice. Written whole or not at all
(:func:`lorasc_kernels._files.atomic_write`). A file that cannot be read or written is
reported once per process (a warning) and the choices stay in memory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch
import triton

from ..._files import atomic_write

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the last writer wins
    fcntl = None

__all__ = ["DIR_SWITCH", "FORMAT", "ChoiceStore"]

DIR_SWITCH = "LORASC_DISPATCH_DIR"
FORMAT = 1


@functools.cache
def _device_model(device: torch.device) -> str:
    """The GPU's model name as a file-name part (``NVIDIA_H100_80GB_HBM3``); ``cpu`` else."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")


def _stack() -> str:
    """A short digest of the versions a choice depends on."""
    from ... import __version__  # here: the package may still be importing this module

    versions = f"torch {torch.__version__} triton {triton.__version__} lorasc {__version__}"
    return hashlib.sha256(versions.encode()).hexdigest()[:12]


class ChoiceStore:
    """Measured variants by problem label, one file per GPU model under ``folder``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.told: set[str] = set()  # files already reported unreadable or unwritable

    @classmethod
    def from_environment(cls) -> ChoiceStore | None:
        """The store in :data:`DIR_SWITCH`'s folder (read now); None if it is set empty."""
        folder = os.environ.get(DIR_SWITCH)
        if folder is None:
            folder = Path.home() / ".cache" / "lorasc_kernels" / "dispatch"
        return cls(folder) if str(folder) else None

    def path(self, device: torch.device) -> Path:
        """The file of ``device``'s GPU model and this version stack."""
        return self.folder / f"gemm-variants-{_device_model(device)}-{_stack()}.json"

    def read(self, device: torch.device) -> dict[str, str]:
        """Every stored choice for ``device``'s model ({} without a readable file)."""
        path = self.path(device)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            self._tell(path, f"cannot be read ({type(error).__name__}: {error})")
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            self._tell(path, f"is not a format-{FORMAT} choice file: ignored")
            return {}
        choices = data.get("choices")
        return choices if isinstance(choices, dict) else {}

    def settle(self, device: torch.device, label: str, variant: str) -> str:
        """Store ``variant`` for ``label`` unless the file already holds a choice for it;
        return the stored choice (``variant`` if the file cannot be written)."""
        path = self.path(device)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked(path):
                choices = self.read(device)
                if label in choices:
                    return choices[label]
                choices[label] = variant
                text = json.dumps({"format": FORMAT, "choices": choices}, indent=1, sort_keys=True)
                atomic_write(path, lambda temporary: temporary.write_text(text + "\n"))
        except OSError as error:
            self._tell(path, f"cannot be written ({type(error).__name__}: {error})")
        return variant

    @contextlib.contextmanager
    def _locked(self, path: Path):
        """An exclusive lock on ``path``'s lock file while the body runs (POSIX)."""
        if fcntl is None:
            yield
            return
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _tell(self, path: Path, what: str) -> None:
        if str(path) not in self.told:
            self.told.add(str(path))
            warnings.warn(
                f"GEMM dispatch choices: {path} {what}; choices kept in memory only "
                f"(set {DIR_SWITCH} to another folder, or empty to stop using one)",
                stacklevel=4,
            )
