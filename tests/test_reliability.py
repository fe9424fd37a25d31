"""Fault injection for what users must be able to rely on (issue 24; ``docs/reliability.md``):
checkpoints refuse altered bytes and unsafe configs before building anything, exports onto a
full disk say where, meta-training never hangs on non-finite truncations, keeps its best
score across a kill, writes its Lightning checkpoints atomically, refuses a second run in its
directory, and the native-kernel cache loads nothing it did not build itself.

References: the exact bytes changed (a flipped byte, a member rewritten with a valid CRC), the
exact errno (ENOSPC), a second process holding the lock, a task family whose loss is NaN.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import learnopt
from learnopt import checkpoint as ckpt
from learnopt.checkpoint import CheckpointError, weights_digest
from learnopt.learned import CoordinatewiseLSTM

ROOT = Path(__file__).resolve().parent.parent
KW = dict(hidden_size=4, num_layers=2, preprocess="log_sign", preprocess_p=5.0, output_scale=0.05)


def _export(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return learnopt.export_checkpoint(CoordinatewiseLSTM(**KW), path, {"meta_steps": 1})


def _rewrite(path: Path, mutate) -> Path:
    """Save ``mutate(payload)`` back to ``path`` as a well-formed file (valid CRCs) whose
    recorded digest is recomputed, so only the check under test can refuse it."""
    payload = torch.load(path, weights_only=True)
    mutate(payload)
    payload["digest"] = weights_digest(payload["state_dict"])
    torch.save(payload, path)
    return path


def _member_offset(path: Path, suffix: str) -> tuple[int, int]:
    """Byte offset and size of the data of the first zip member whose name ends with ``suffix``."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    raw = path.read_bytes()
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _refused(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        learnopt.load(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for fragment in fragments:
        assert fragment.lower() in msg.lower(), (fragment, msg)
    return msg


# --------------------------------------------------------------------------- checkpoints


def test_a_weight_with_altered_bytes_is_refused(tmp_path):
    path = _export(tmp_path / "lopt.pt")
    start, size = _member_offset(path, "data/1")
    raw = bytearray(path.read_bytes())
    raw[start + size // 2] ^= 0x01  # one bit of one weight: still a finite float
    path.write_bytes(bytes(raw))
    _refused(path, "corrupt", "crc")


def test_a_weight_rewritten_with_a_valid_crc_fails_the_digest(tmp_path):
    path = _export(tmp_path / "lopt.pt")
    altered = tmp_path / "altered.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(altered, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data/1"):
                data = bytes([data[0] ^ 0x01]) + data[1:]
            dst.writestr(info, data)
    _refused(altered, "digest")


def test_a_corrupt_pickle_member_is_called_corrupt(tmp_path):
    path = _export(tmp_path / "lopt.pt")
    start, size = _member_offset(path, "data.pkl")
    raw = bytearray(path.read_bytes())
    raw[start + size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    msg = _refused(path, "corrupt")
    assert "objects other than tensors" not in msg


@pytest.mark.parametrize("key,value", [
    ("hidden_size", 10**7), ("hidden_size", 2**19), ("num_layers", 0), ("hidden_size", 2.5),
    ("output_scale", float("nan")), ("output_scale", float("inf")),
    ("preprocess_p", float("nan")), ("preprocess_p", float("-inf")), ("preprocess_p", 0.0),
])
def test_a_bad_config_is_refused_naming_the_key_before_anything_is_allocated(tmp_path, monkeypatch, key, value):
    path = _rewrite(_export(tmp_path / "lopt.pt"), lambda p: p["config"].update({key: value}))
    devices = []
    real_init = CoordinatewiseLSTM.__init__

    def recording_init(self, *args, **kwargs):
        devices.append(torch.get_default_device().type)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(CoordinatewiseLSTM, "__init__", recording_init)
    _refused(path, key)
    assert set(devices) <= {"meta"}, f"built on {devices} before the config was refused"


def test_export_onto_a_full_disk_names_the_path_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = _export(tmp_path / "lopt.pt", seed=1)
    before = path.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(OSError) as info:
        _export(path, seed=2)
    assert info.value.errno == errno.ENOSPC
    assert str(path) in str(info.value) and "No space left" in str(info.value)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["lopt.pt"]


def test_files_written_before_the_digest_still_load(tmp_path):
    path = _export(tmp_path / "lopt.pt")
    payload = torch.load(path, weights_only=True)
    del payload["digest"]
    torch.save(payload, path)
    assert learnopt.load(path).config() == KW
