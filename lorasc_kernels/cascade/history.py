"""Where a Cascade keeps its merged updates (``keep_history``): in memory or on disk.

In memory (the default): per layer an :class:`UpdateList` of ``(c·B_t (N, r), A_t (r, K))``
float32 CPU tensors, saved whole in ``Cascade.state_dict()``.

On disk (``history_dir``): per layer an :class:`UpdateFile`, ``layer-<index>.f32`` in that
folder; record ``t`` is ``c·B_t`` then ``A_t``, float32, row-major, appended (and flushed)
at the boundary that merges it. ``Cascade.state_dict()`` fsyncs the files and holds, per
layer, ``{"count": T, "sha256": digest of the first T records}`` instead of the tensors;
loading it reads the files once and refuses a file that is shorter or whose records differ,
before anything is taken. Bytes past the saved count (a record torn by a crash, or the
records of a run continued from a later checkpoint) are ignored, then overwritten by the
next append: one folder per run, and resuming from an earlier checkpoint makes the later
ones unresumable (their records are overwritten).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from .. import _checks as checks

__all__ = ["UpdateFile", "UpdateList", "new_history", "history_state", "restored_history"]

_DIGEST = re.compile(r"[0-9a-f]{64}")


class UpdateList(list):
    """A layer's kept updates in memory: a list (that can be weakly referenced)."""

    __slots__ = ("__weakref__",)


class UpdateFile:
    """A layer's kept updates in one file; a sequence of ``(c·B (N, r), A (r, K))`` float32
    pairs, each read from the file when indexed."""

    def __init__(self, path: Path, shapes, count: int = 0, digest=None):
        self.path = Path(path)
        self.shapes = tuple(tuple(shape) for shape in shapes)
        self.sizes = [shape[0] * shape[1] for shape in self.shapes]
        self.record_bytes = 4 * sum(self.sizes)
        self.count = count
        self._digest = digest if digest is not None else hashlib.sha256()

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if not -self.count <= index < self.count:
            raise IndexError(f"update {index} of {self.count}")
        buffer = bytearray(self.record_bytes)
        with open(self.path, "rb") as handle:
            handle.seek((index % self.count) * self.record_bytes)
            if handle.readinto(buffer) != self.record_bytes:
                raise ValueError(f"{self.path} is shorter than its {self.count} updates")
        lora_b = torch.frombuffer(buffer, dtype=torch.float32, count=self.sizes[0])
        lora_a = torch.frombuffer(buffer, dtype=torch.float32, offset=4 * self.sizes[0])
        return lora_b.view(self.shapes[0]), lora_a.view(self.shapes[1])

    def __iter__(self):
        return (self[index] for index in range(self.count))

    def append(self, pair) -> None:
        """Write ``pair`` as record ``len(self)`` (anything after it is cut); counted once
        written, so a failed write leaves the file's count as it was."""
        parts = [_raw(tensor) for tensor in pair]
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        with os.fdopen(descriptor, "r+b") as handle:
            handle.seek(self.count * self.record_bytes)
            for part in parts:
                handle.write(part)
            handle.truncate()
        for part in parts:
            self._digest.update(part)
        self.count += 1

    def saved(self) -> dict:
        """The file made durable (fsync) and ``{"count", "sha256"}`` for a state dict."""
        if self.path.exists():
            with open(self.path, "rb") as handle:
                os.fsync(handle.fileno())
        return {"count": self.count, "sha256": self._digest.hexdigest()}


def new_history(settings, layers: dict) -> dict:
    """Empty kept updates per layer: in memory, or (``settings.history_dir``) in files of
    that folder, created if missing (no file written until the first update)."""
    if settings.history_dir is None:
        return {name: UpdateList() for name in layers}
    folder = Path(settings.history_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"history_dir {str(folder)!r} cannot be a folder: {error}") from None
    return {
        name: UpdateFile(folder / f"layer-{index:05d}.f32", _shapes(layer))
        for index, (name, layer) in enumerate(layers.items())
    }


def history_state(history: dict) -> dict:
    """The kept updates as ``Cascade.state_dict()`` holds them: lists of pairs, or per file
    its count and digest."""
    return {
        name: updates.saved() if isinstance(updates, UpdateFile) else list(updates)
        for name, updates in history.items()
    }


def check_saved_history(history, layers: dict, settings) -> None:
    """``state['history']``'s form: per layer, finite ``(c·B (out, r), A (r, in))`` pairs
    (none unless ``keep_history``), or with ``history_dir`` a ``{"count", "sha256"}``."""
    if not isinstance(history, dict) or list(history) != list(layers):
        raise ValueError(
            f"state['history'] must be a dict with one list per layer, keyed {list(layers)}"
        )
    for name, layer in layers.items():
        saved, where = history[name], f"state['history'][{name!r}]"
        if settings.history_dir is not None:
            _check_reference(where, saved)
            continue
        if isinstance(saved, dict):
            raise ValueError(
                f"{where} refers to updates kept on disk, and this Cascade keeps them in "
                "memory: set history_dir to the folder that holds them"
            )
        if not isinstance(saved, (list, tuple)):
            raise TypeError(f"{where} must be a list, got {type(saved).__name__}")
        if saved and not settings.keep_history:
            raise ValueError(f"{where} holds updates but keep_history is False")
        shapes = _shapes(layer)
        for t, pair in enumerate(saved):
            if not (
                isinstance(pair, (list, tuple))
                and len(pair) == 2
                and all(
                    isinstance(x, torch.Tensor) and tuple(x.shape) == shape
                    for x, shape in zip(pair, shapes, strict=True)
                )
            ):
                raise ValueError(
                    f"{where}[{t}] must be a pair of tensors of shapes {shapes} (c·B, A)"
                )
            for part, tensor in zip(("c·B", "A"), pair, strict=True):
                checks.check_saved_values(f"{where}[{t}] ({part})", tensor)


def restored_history(history: dict, settings, layers: dict) -> dict:
    """The kept updates of ``history`` (checked by :func:`check_saved_history`): new lists,
    or the files of ``settings.history_dir`` once each is found to hold the saved records
    (read whole and hashed; ``ValueError`` naming the file otherwise). Writes nothing."""
    if settings.history_dir is None:
        return {name: UpdateList(pairs) for name, pairs in history.items()}
    restored = new_history(settings, layers)
    for name, updates in restored.items():
        count, expected = history[name]["count"], history[name]["sha256"]
        digest, length = hashlib.sha256(), count * updates.record_bytes
        try:
            with open(updates.path, "rb") as handle:
                while length > 0 and (block := handle.read(min(length, 1 << 20))):
                    digest.update(block)
                    length -= len(block)
        except FileNotFoundError:
            pass  # refused below unless no update was saved
        if length or digest.hexdigest() != expected:
            raise ValueError(
                f"state['history'][{name!r}]: {updates.path} does not hold the {count} updates "
                "the state was saved with (missing, shorter, or other records): point "
                "history_dir at that run's folder, or resume from a checkpoint of this one"
            )
        updates.count, updates._digest = count, digest
    return restored


def _check_reference(where: str, saved) -> None:
    """``saved`` is ``{"count": int >= 0, "sha256": 64 hex digits}``."""
    if not isinstance(saved, dict) or set(saved) != {"count", "sha256"}:
        raise ValueError(
            f"{where} must be {{'count', 'sha256'}} of updates kept in history_dir, got "
            f"{type(saved).__name__}"
        )
    checks.check_int(f"{where}['count']", saved["count"], 0)
    if not isinstance(saved["sha256"], str) or not _DIGEST.fullmatch(saved["sha256"]):
        raise ValueError(f"{where}['sha256'] must be 64 hex digits, got {saved['sha256']!r}")


def _shapes(layer) -> tuple[tuple[int, int], tuple[int, int]]:
    """The shapes ``((out, r), (r, in))`` of a layer's kept ``(c·B, A)``."""
    return (layer.out_features, layer.r), (layer.r, layer.in_features)


def _raw(tensor: torch.Tensor):
    """The bytes of ``tensor`` as a float32 CPU array (a view where it is one already)."""
    flat = tensor.detach().to("cpu", torch.float32).contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()
