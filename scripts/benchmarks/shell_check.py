"""The meta-training shell on an accelerator: a few meta-steps of each family's config through
``learnopt meta-train`` (Lightning, validation, export), then the exported checkpoint loaded on
the CPU and run there. A check of the GPU path end to end (``gpu_check.sh`` runs it with
``--accelerator gpu``), not a benchmark: the steps are too few for a rate worth quoting.

    python scripts/benchmarks/shell_check.py --accelerator gpu
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import learnopt  # noqa: E402

CONFIGS = ["lstm_quadratic", "mlp_lopt_quadratic", "rnn_proposer_d3", "vsml_sgd_clone", "vsml_meta"]


def smoke_use(model, path: Path) -> str:
    """Run a loaded checkpoint on the CPU, the way a user would; a short description."""
    if getattr(model, "kind", "") == "blackbox_proposer":
        res = model.minimize(lambda x: float(sum((v - 0.3) ** 2 for v in x)), [(0.0, 1.0)] * model.dim, budget=8)
        return f"minimize: fun {res.fun:.3g} in {res.nfev} evaluations"
    if hasattr(model, "online"):
        gen = torch.Generator().manual_seed(0)
        pred = model.online(torch.randn(12, 5, generator=gen), torch.randint(0, 3, (12,), generator=gen))
        return f"online: {len(pred)} predictions"
    net = torch.nn.Linear(4, 2)
    opt = learnopt.load_optimizer(path, net.parameters())
    net(torch.randn(3, 4)).pow(2).sum().backward()
    opt.step()
    return "drop-in step"


def run(config: str, accelerator: str, steps: int, work: Path) -> dict:
    out = work / config
    cmd = [sys.executable, "-m", "learnopt.cli", "meta-train", "--config", str(ROOT / "configs" / f"{config}.yaml"),
           "--trainer.accelerator", accelerator, "--trainer.devices", "1", "--trainer.max_steps", str(steps),
           "--trainer.val_check_interval", str(max(1, steps // 2)), "--trainer.logger", "false",
           "--trainer.default_root_dir", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    seconds = time.perf_counter() - start
    text = proc.stdout + proc.stderr
    row = {"config": config, "exit": proc.returncode, "seconds": round(seconds, 1),
           "accelerator_used": bool(re.search(r"GPU available: True \(cuda\), used: True", text))
           if accelerator == "gpu" else None}
    exported = re.search(r"learned optimizer exported to (\S+)", text)
    if proc.returncode != 0 or not exported:
        row["error"] = text[-1500:]
        return row
    path = (out.parent / exported.group(1)).resolve()
    try:
        model = learnopt.load(path)  # on the CPU, whatever device trained it
        row["loaded_on_cpu"] = type(model).__name__
        row["cpu_use"] = smoke_use(model, path)
    except Exception as exc:  # report it and go on to the next config
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            (Path(tmp) / config).mkdir()
            row = run(config, args.accelerator, args.steps, Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    print("\n| config | exit | s | accelerator used | loaded on CPU | used there |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['exit']} | {r['seconds']} | {r['accelerator_used']} | "
              f"{r.get('loaded_on_cpu', '—')} | {r.get('cpu_use', r.get('error', '')[:80])} |")
    return 0 if all(r["exit"] == 0 and "error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
