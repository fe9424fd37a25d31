"""Lightning checkpoints for resuming meta-training, written atomically in their own directory
and read back with errors that name the file.

Lightning's ``TorchCheckpointIO`` stages the file in the system temp directory and moves it to
the target; across filesystems that move is a copy, and a full disk leaves a truncated
``last.ckpt`` where a good one was. ``AtomicCheckpointIO`` writes the temp file beside the
target, flushes it to disk and renames it, so the target is always a whole checkpoint.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from learnopt.checkpoint import FORMAT as EXPORT_FORMAT
from learnopt.atomic_file import write_atomically
from learnopt.checkpoint import CheckpointError


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def atomic_write(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory, flushed to disk and
    renamed over ``path``. On failure the temp file is removed, ``path`` is as it was, and the
    ``OSError`` names ``path``.

    Args:
        data: the bytes to write.
        path: the target, a local path (a ``file://`` prefix is dropped).
    """
    write_atomically(Path(str(path).removeprefix("file://")), lambda f: f.write(data), "the Lightning checkpoint")


def check_resume_file(path: str | os.PathLike) -> None:
    """Refuse, naming ``path``, a file that cannot be a Lightning checkpoint: missing, a
    directory, not a zip archive as ``torch.save`` writes (truncated, garbage) or with a member
    whose CRC fails.

    Args:
        path: the checkpoint to resume from.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: it is a directory, not a zip archive, or corrupt.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--ckpt_path {path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"--ckpt_path {path}: is a directory, not a Lightning checkpoint file")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"--ckpt_path {path}: corrupt or truncated, not a checkpoint written by torch.save "
                              f"({type(e).__name__}: {e}); resume from an earlier checkpoint") from e
    if bad is not None:
        raise CheckpointError(f"--ckpt_path {path}: corrupt, member {bad!r} fails its CRC check; "
                              "resume from an earlier checkpoint")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes local checkpoints atomically in the target directory
    (remote URLs keep Lightning's own path) and checks a checkpoint before resuming from it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(buffer.getvalue(), path)

    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location, weights_only)
        check_resume_file(path)
        try:
            checkpoint = super().load_checkpoint(path, map_location, weights_only)
        except Exception as e:
            raise CheckpointError(f"--ckpt_path {path}: cannot be read as a Lightning checkpoint "
                                  f"({type(e).__name__}: {e})") from e
        if isinstance(checkpoint, dict) and checkpoint.get("format") == EXPORT_FORMAT:
            raise CheckpointError(f"--ckpt_path {path}: is an exported learned optimizer (for learnopt.load or "
                                  "--model.init_from), not a Lightning checkpoint; resume from the run's "
                                  "Lightning checkpoint directory (e.g. last.ckpt)")
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
            raise CheckpointError(f"--ckpt_path {path}: not a Lightning checkpoint (no 'state_dict' and 'global_step')")
        return checkpoint
