"""Shared pieces of the benchmarks: the machine's description, interleaved timing, the
machine's measured matmul rate and memory bandwidth, and writing results beside the docs.

Timing is interleaved: every repetition runs each contender once, in turn, and the reported
figure is the median over repetitions, so that load from other processes on a shared
machine hits all contenders alike; ratios are taken between medians of the same run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "benchmarks"


def machine() -> dict:
    """CPU model, cores, threads used, torch version, load at the start (the machine may be shared)."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device: str = "cpu",
                desc: str = "timing") -> dict[str, float]:
    """Median seconds per call of each function, timed in turn ``repeats`` times."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_rate(device: str = "cpu", n: int = 2048, repeats: int = 7, dtype: torch.dtype = torch.float32) -> float:
    """The machine's measured matrix-multiply rate in FLOP/s (median of ``repeats`` n×n products)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = interleaved({"mm": lambda: a @ b}, repeats, device=device, desc="matmul rate")["mm"]
    return 2 * n**3 / t


def memory_bandwidth(device: str = "cpu", numel: int = 1 << 26, repeats: int = 7) -> float:
    """Measured memory bandwidth in bytes/s: a copy of ``numel`` float32 (256 MiB) reads and
    writes each byte once."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = interleaved({"copy": lambda: dst.copy_(src)}, repeats, device=device, desc="bandwidth")["copy"]
    return 2 * numel * 4 / t


def write_json(name: str, payload: dict) -> Path:
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(x: object) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)

