"""An optional native CPU kernel for the elementwise tail of the drop-in LSTM step.

After each layer's matmul, the drop-in step (``CoordinatewiseLSTM.update_``) turns the gate
pre-activations into the new cell and hidden state. Written with torch operations that is a
sigmoid over the gates, three ``addcmul``s and another sigmoid: five passes over memory and
five kernel launches per layer and block. This module does it in one pass per block with a
small C++ function, compiled on first use with the system's C++ compiler and loaded with
``ctypes``:

* no torch headers, so it compiles in about a second; the library is cached under
  ``$LEARNOPT_CACHE`` (default ``~/.cache/learnopt``), keyed by the source, the flags, the
  compiler and the CPU (it is built with ``-march=native``);
* ``expf``/``exp`` are vectorised through glibc's ``libmvec``;
* it is single-threaded, so it is used only when torch runs one thread
  (``torch.get_num_threads() == 1``). With more, torch's own operations run the tail in
  parallel and were faster: at 1M parameters with 2 threads, 122 ms per step against 142 ms
  with the rows split across a Python thread pool, which also slowed the matmuls around it;
* anything that fails (no compiler, no ``libmvec``, another platform) leaves the torch
  operations in place, with one warning; ``LEARNOPT_NATIVE_KERNELS=0`` turns the kernel off.

The cache is trusted like code (loading a library runs its constructors), so nothing is
loaded on its name alone: the cache directory is created 0700 whatever the umask and must be
owned by the user (one writable by others is made 0700 first, and what it holds is checked file by file); a library is loaded only if it
is a regular file owned by the user, writable by nobody else, and its SHA-256 equals the one
recorded beside it (``<name>.sha256``) when it was built. The check reads the library through
an open descriptor and ``dlopen`` loads that same descriptor (``/proc/self/fd``), so the file
cannot be swapped in between. A library that fails any check (truncated, planted, altered) is
rebuilt; a truncated one is thus never mapped (it would die with SIGBUS).

The arithmetic is the torch path's (``tests/test_speed_paths.py`` checks them against each
other): gates in the order (i, f, o, g') with g' = −2 z_g, so that i·tanh(z_g) = i − 2 i σ(g');
``c ← f c + i (1 − 2 σ(g'))``, ``h ← o (1 − 2 σ(−2 c))``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

SOURCE = r"""
#include <math.h>
#include <stdint.h>

// Vector variants of expf/exp exist in glibc's libmvec; declaring them lets the compiler
// vectorise the loop without -ffast-math (which would also drop inf and NaN semantics).
extern "C" float expf(float) __attribute__((simd("notinbranch")));
extern "C" double exp(double) __attribute__((simd("notinbranch")));

template <typename T, T (*EXP)(T)>
static void lstm_tail(T* __restrict g, T* __restrict c, T* __restrict h, int64_t H, int64_t m,
                      int64_t gs, int64_t cs, int64_t hs) {
  const T one = 1, two = 2;
  for (int64_t j = 0; j < H; ++j) {
    const T* __restrict gi = g + j * gs;
    const T* __restrict gf = g + (H + j) * gs;
    const T* __restrict go = g + (2 * H + j) * gs;
    const T* __restrict gg = g + (3 * H + j) * gs;
    T* __restrict cj = c + j * cs;
    T* __restrict hj = h + j * hs;
#pragma omp simd
    for (int64_t k = 0; k < m; ++k) {
      T i = one / (one + EXP(-gi[k]));
      T f = one / (one + EXP(-gf[k]));
      T o = one / (one + EXP(-go[k]));
      T s = one / (one + EXP(-gg[k]));
      T cn = f * cj[k] + i * (one - two * s);
      cj[k] = cn;
      hj[k] = o * (one - two / (one + EXP(two * cn)));
    }
  }
}

extern "C" void lstm_tail_f32(float* g, float* c, float* h, int64_t H, int64_t m, int64_t gs,
                              int64_t cs, int64_t hs) {
  lstm_tail<float, expf>(g, c, h, H, m, gs, cs, hs);
}

extern "C" void lstm_tail_f64(double* g, double* c, double* h, int64_t H, int64_t m, int64_t gs,
                              int64_t cs, int64_t hs) {
  lstm_tail<double, exp>(g, c, h, H, m, gs, cs, hs);
}
"""

FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-shared", "-fPIC"]
LIBS = ["-lmvec"]

_library: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _fallback(problem: str) -> None:
    """Warn that the kernel is unavailable because of ``problem``; the caller returns None."""
    warnings.warn(f"learnopt: {problem}; the drop-in LSTM step uses torch operations for its elementwise tail",
                  RuntimeWarning, stacklevel=4)


def _private_dir(path: Path) -> Path:
    """``path`` (and missing parents) created 0700 whatever the umask; an existing ``path`` must
    be a real directory owned by the user, and is made 0700 if others could write to it."""
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise OSError(f"the kernel cache {path} is not a directory owned by this user (uid {os.getuid()})")
    if info.st_mode & 0o022:
        os.chmod(path, 0o700)
    return path


def _trusted_bytes(fd: int) -> bytes | None:
    """The contents of the open file ``fd`` if it is a regular file owned by the user and
    writable by nobody else, else None."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        return None
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _open_verified(target: Path) -> int | None:
    """A descriptor of ``target`` whose bytes hash to the digest recorded at build time, or None."""
    digest_file = target.with_name(target.name + ".sha256")
    try:
        fd = os.open(digest_file, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            recorded = _trusted_bytes(fd)
        finally:
            os.close(fd)
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    data = _trusted_bytes(fd)
    if recorded is None or data is None or hashlib.sha256(data).hexdigest() != recorded.decode(errors="replace").strip():
        os.close(fd)
        return None
    return fd


def _compile(cxx: str, cache: Path, target: Path) -> None:
    """Build the library into a private temp directory, record its digest, and move both into
    place (renames: concurrent builders never see a partial file)."""
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src = Path(tmp) / "lstm_tail.cpp"
        src.write_text(SOURCE)
        out = Path(tmp) / "lstm_tail.so"
        done = subprocess.run([cxx, *FLAGS, str(src), "-o", str(out), *LIBS], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip()[-2000:])
        os.chmod(out, 0o700)
        digest = Path(tmp) / "lstm_tail.so.sha256"
        digest.write_text(hashlib.sha256(out.read_bytes()).hexdigest() + "\n")
        os.chmod(digest, 0o600)
        os.replace(out, target)
        os.replace(digest, target.with_name(target.name + ".sha256"))


def _build() -> ctypes.CDLL | None:
    """Compile (or find, verified, in the cache) and load the kernel library; None when that fails."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None  # libmvec's vector variants are glibc x86-64
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        _fallback("no C++ compiler found (set CXX)")
        return None
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
        key = hashlib.sha256("\0".join([SOURCE, *FLAGS, *LIBS, version, _cpu_signature()]).encode()).hexdigest()[:16]
        cache = _private_dir(Path(os.environ.get("LEARNOPT_CACHE", Path.home() / ".cache" / "learnopt")) / "kernels")
        target = cache / f"lstm_tail_{key}.so"
        fd = _open_verified(target)
        if fd is None:  # absent, or failing a check: never loaded, built afresh
            _compile(cxx, cache, target)
            fd = _open_verified(target)
            if fd is None:
                raise RuntimeError(f"the freshly built {target} fails its ownership or digest check")
    except (OSError, RuntimeError) as err:
        _fallback(f"building the native LSTM kernel failed ({err})")
        return None
    try:
        lib = ctypes.CDLL(f"/proc/self/fd/{fd}")  # the verified file itself, not whatever the name holds now
    except OSError as err:  # e.g. a cached library whose runtime dependencies went away
        _fallback(f"loading the native LSTM kernel {target} failed ({err})")
        return None
    finally:
        os.close(fd)
    for name in ("lstm_tail_f32", "lstm_tail_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5
        fn.restype = None
    return lib


def enabled() -> bool:
    return os.environ.get("LEARNOPT_NATIVE_KERNELS", "1") != "0"


def lstm_tail(dtype: torch.dtype) -> Callable[[Tensor, Tensor, Tensor], None] | None:
    """The native tail for CPU tensors of ``dtype``, or None (not built, turned off, torch running
    more than one thread, or a dtype other than float32/float64). The callable takes
    ``gates [4H, m]``, ``c [H, m]`` and ``h [H, m]``, each with unit stride along ``m``, updates
    ``c`` and writes ``h``."""
    global _library
    if not enabled() or dtype not in (torch.float32, torch.float64) or torch.get_num_threads() > 1:
        return None
    if _library is False:
        _library = _build()
    if _library is None:
        return None
    fn = _library.lstm_tail_f32 if dtype == torch.float32 else _library.lstm_tail_f64

    def tail(gates: Tensor, c: Tensor, h: Tensor) -> None:
        hidden, m = c.shape
        if not (gates.shape == (4 * hidden, m) and h.shape == (hidden, m)
                and gates.stride(1) == c.stride(1) == h.stride(1) == 1
                and gates.dtype == c.dtype == h.dtype == dtype and gates.device.type == "cpu"):
            raise ValueError(f"lstm_tail: gates {tuple(gates.shape)}, c {tuple(c.shape)}, h {tuple(h.shape)} must be "
                             f"[4H, m], [H, m], [H, m] {dtype} CPU tensors with unit stride along m")
        fn(gates.data_ptr(), c.data_ptr(), h.data_ptr(), hidden, m, gates.stride(0), c.stride(0), h.stride(0))

    return tail
