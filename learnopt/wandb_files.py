"""Reading W&B's offline transaction logs (``.wandb`` files) without the network or a W&B
process: the record framing and its checks (a leaf module: ``compare`` reads runs with it, and
``logging_schema`` asks it whether a run finished)."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path


class RunReadError(ValueError):
    """A W&B run that cannot be read; the message names the file and the problem."""


# LevelDB log format as W&B writes it (a 7-byte file header, then 32 KiB blocks of records,
# each with a 7-byte header: CRC-32 of type and payload, payload length, type).
_FILE_HEADER = struct.Struct("<4sHB")
_IDENT, _MAGIC = b":W&B", 0xBEE1
_BLOCK = 32768
_REC_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _transaction_log_records(path: Path) -> list[bytes]:
    """The payloads of the records in a ``.wandb`` file, checked against their CRCs. A run
    still being written may end in a partial record, which is dropped."""
    return _scan_log(path)[0]


def _scan_log(path: Path) -> tuple[list[bytes], int | None]:
    """``_transaction_log_records`` and the byte offset of the partial record the file ends in
    (None when it ends on a record boundary)."""
    data = path.read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise RunReadError(f"{path}: too short to be a W&B transaction log")
    ident, magic, version = _FILE_HEADER.unpack_from(data)
    if ident != _IDENT or magic != _MAGIC:
        raise RunReadError(f"{path}: not a W&B transaction log (header {data[:7]!r})")
    if version != 0:
        raise RunReadError(f"{path}: W&B transaction log version {version} is not supported (only 0)")
    records, pending, pos, partial = [], None, _FILE_HEADER.size, None
    while pos + _REC_HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _REC_HEADER.size:  # block trailer: zero padding
            pos += left
            continue
        crc, length, kind = _REC_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero-filled rest of a block
            pos += left
            continue
        start, pos = pos + _REC_HEADER.size, pos + _REC_HEADER.size + length
        payload = data[start:pos]
        if len(payload) < length:
            partial = start - _REC_HEADER.size  # a tail cut inside a record
            break
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise RunReadError(f"{path}: corrupt record at byte {start - _REC_HEADER.size} (CRC mismatch)")
        if kind == _FULL:
            records.append(payload)
        elif kind == _FIRST:
            pending = payload
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending += payload
            if kind == _LAST:
                records.append(pending)
                pending = None
        else:
            raise RunReadError(f"{path}: bad record type {kind} at byte {start - _REC_HEADER.size}")
    if partial is None and pos < len(data) and any(data[pos:]):
        partial = pos  # fewer bytes than a record header, and not the zero padding of a block
    if partial is None and pending is not None:
        partial = pos  # a record split across blocks whose last fragment never came
    return records, partial


def log_is_complete(path: str | os.PathLike) -> bool:
    """Whether the ``.wandb`` file at ``path`` holds its run's exit record (the run finished and
    W&B wrote it out).

    Args:
        path: the ``.wandb`` file.

    Returns:
        False when it has no exit record, or cannot be read or decoded.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    try:
        payloads = _transaction_log_records(Path(path))
    except (OSError, RunReadError):
        return False
    for payload in reversed(payloads):
        record = pb.Record()
        try:
            record.ParseFromString(payload)
        except Exception:  # noqa: BLE001
            return False
        if record.WhichOneof("record_type") == "exit":
            return True
    return False
