"""``learnopt.runtime``: the allocator setting that ``learnopt meta-train`` applies."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from learnopt import runtime

ROOT = Path(__file__).resolve().parent.parent
GLIBC = platform.libc_ver()[0] == "glibc"

# A fresh process allocates an 8 MiB tensor and reports whether glibc served it with mmap
# (mallinfo2's hblkhd: bytes in mmapped blocks), with and without keep_freed_memory.
PROBE = """
import ctypes, sys
import torch
from learnopt import runtime

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = runtime.keep_freed_memory() if sys.argv[1] == "keep" else None
before = libc.mallinfo2().hblkhd
x = torch.ones(2 * 2**20)  # 8 MiB
print(applied, libc.mallinfo2().hblkhd - before)
"""


def _probe(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, mapped = out.stdout.split()
    return applied, int(mapped)


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_keep_freed_memory_serves_large_tensors_from_the_heap():
    applied, mapped = _probe("default")
    assert mapped >= 8 * 2**20  # glibc's default: a fresh mmap, page faults on first touch
    applied, mapped = _probe("keep")
    assert applied == "True" and mapped == 0


def test_apply_defaults_can_be_switched_off(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setenv(runtime.ENV_SWITCH, "0")
    assert runtime.apply_defaults() is False and not calls
    monkeypatch.delenv(runtime.ENV_SWITCH)
    assert runtime.apply_defaults() is True and calls == [1]
