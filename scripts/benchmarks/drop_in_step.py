"""Drop-in step time of the learned optimizers against ``torch.optim.Adam(foreach=True)`` on
MLPs of 10k to 10M parameters, and the coordinate-wise LSTM's step against its own lower
bound.

The timed call is ``opt.step()`` alone, on fixed gradients (the backward pass is the same
for every optimizer). Contenders, timed in turn each repetition (medians):

* ``adam``: ``torch.optim.Adam(foreach=True)``;
* ``lstm``: ``learnopt.load_optimizer("checkpoints/lstm_digits_mlp.pt", ...)``, the in-place
  blocked step (``CoordinatewiseLSTM.update_``);
* ``lstm functional``: the same checkpoint with ``inplace_update=None`` (the functional
  ``update``, which allocates a new state every step), up to ``--functional-max``;
* ``lstm compiled``: the functional step through ``torch.compile``, up to ``--compile-max``;
* ``mlp_lopt``: ``checkpoints/mlp_lopt_digits_mlp.pt`` (per-coordinate MLP on Adam-like
  features).

Lower bound of the LSTM step: max(FLOPs / measured matmul rate, bytes / measured memory
bandwidth), both rates measured in this run, interleaved with the steps (a 1536² matmul and
a 256 MiB copy each repetition) so that they see the same load as the steps. Bytes: the
state (h, c of every layer) read and written, the gradient read, the parameter read and
written. FLOPs, counted two ways (``lstm_flops_and_bytes``):

* the LSTM's matmuls only, 2 (in + H) 4H per layer and 2H for the output, per coordinate
  (9,960 for the shipped LSTM): the stricter bound, column "LSTM / bound";
* every FLOP of the step, the elementwise ones too, with an exp or a log counted as one
  (1,250 more): column "LSTM / bound with elementwise FLOPs". Every FLOP at the measured
  matmul rate is still a lower bound, since no FLOP runs faster than a dense matmul's.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmarks/drop_in_step.py
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import learnopt  # noqa: E402
from common import ROOT, interleaved, machine, markdown_table, write_json  # noqa: E402

# width d of Linear(d, d) -> ReLU -> Linear(d, d): 2 (d² + d) parameters
WIDTHS = {"10k": 70, "100k": 223, "1M": 707, "10M": 2236}
RATE_N = 1536  # n × n matmul for the machine's matmul rate
BANDWIDTH_NUMEL = 1 << 26  # float32 copy (256 MiB) for its memory bandwidth
LSTM = ROOT / "checkpoints" / "lstm_digits_mlp.pt"
MLP_LOPT = ROOT / "checkpoints" / "mlp_lopt_digits_mlp.pt"


def lstm_flops_and_bytes(lopt) -> tuple[float, float, float]:
    """Per coordinate: FLOPs of the LSTM's matmuls; FLOPs of everything else (each exp or log
    counted as one FLOP); bytes of state, gradient and parameter traffic.

    The elementwise count, per coordinate: the log/sign inputs (|g|, clamp, log, scale; scale,
    clamp on both sides: 7, or 0 without preprocessing); per layer and hidden unit, the four
    gate biases (4), the four sigmoids (negate, exp, add, divide: 16), the cell update
    c ← f c + i (1 − 2 σ) (5) and h ← o (1 − 2 / (1 + exp(2c))) (6); the output bias (1); and
    applying the update to the parameter (scale and add: 2)."""
    hidden, flops, inputs = lopt.hidden_size, 0.0, 2 if lopt.preprocess == "log_sign" else 1
    for _ in range(lopt.num_layers):
        flops += 2 * (inputs + hidden) * 4 * hidden
        inputs = hidden
    flops += 2 * hidden
    elementwise = (7 if lopt.preprocess == "log_sign" else 0) + lopt.num_layers * hidden * (4 + 16 + 5 + 6) + 1 + 2
    size = torch.finfo(lopt.dtype).bits // 8
    state = 2 * lopt.num_layers * hidden * size
    return flops, float(elementwise), 2 * state + size + 2 * size


def make_model(width: int, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def run_size(label: str, width: int, repeats: int, functional_max: int, compile_max: int,
             with_mlp_lopt: bool, device: str = "cpu") -> dict:
    model = make_model(width, device)
    n = sum(p.numel() for p in model.parameters())
    optimizers = {"adam": torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True),
                  "lstm": learnopt.load_optimizer(LSTM, model.parameters())}
    if n <= functional_max:
        optimizers["lstm functional"] = learnopt.load_optimizer(LSTM, model.parameters(), inplace_update=None)
    if n <= compile_max:
        lopt = learnopt.load(LSTM).to(device)
        from learnopt.optim.base import GradientTransformation
        from learnopt.optim.torch_optimizer import TransformOptimizer

        tx = GradientTransformation(lopt.init, torch.compile(lopt.update, dynamic=False))
        optimizers["lstm compiled"] = TransformOptimizer(tx, model.parameters())
    if with_mlp_lopt:
        optimizers["mlp_lopt"] = learnopt.load_optimizer(MLP_LOPT, model.parameters())
    # the machine's rates, measured interleaved with the steps so that they see the same load
    a, b = torch.randn(RATE_N, RATE_N, device=device), torch.randn(RATE_N, RATE_N, device=device)
    src = torch.randn(BANDWIDTH_NUMEL, device=device)
    dst = torch.empty_like(src)
    fns = {}
    for k, opt in optimizers.items():
        fns[k] = opt.step
    fns.update({"matmul": lambda: a @ b, "copy": lambda: dst.copy_(src)})
    seconds = interleaved(fns, repeats, warmup=1, desc=label, device=device)
    rate = 2 * RATE_N**3 / seconds.pop("matmul")
    bandwidth = 2 * 4 * BANDWIDTH_NUMEL / seconds.pop("copy")
    flops, elementwise, nbytes = lstm_flops_and_bytes(learnopt.load(LSTM))
    bound = max(n * flops / rate, n * nbytes / bandwidth)
    bound_all = max(n * (flops + elementwise) / rate, n * nbytes / bandwidth)
    result = {
        "model": label, "parameters": n, "seconds": seconds,
        "vs_adam": {k: s / seconds["adam"] for k, s in seconds.items()},
        "lstm_lower_bound_seconds": bound, "lstm_flop_bound": n * flops / rate,
        "lstm_byte_bound": n * nbytes / bandwidth,
        "lstm_over_bound": seconds["lstm"] / bound,
        "lstm_lower_bound_all_flops_seconds": bound_all, "lstm_over_bound_all_flops": seconds["lstm"] / bound_all,
        "matmul_flops_per_second": rate, "memory_bytes_per_second": bandwidth,
    }
    del optimizers, model
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--functional-max", type=int, default=1_100_000,
                        help="largest model for the functional LSTM step (it allocates ~10 state-sized tensors)")
    parser.add_argument("--compile-max", type=int, default=1_100_000,
                        help="largest model for the compiled step; 0: none")
    parser.add_argument("--no-mlp-lopt", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="drop_in_step")
    args = parser.parse_args(argv)
    results = {"machine": machine(),
               "command": "OMP_NUM_THREADS=%d .venv/bin/python scripts/benchmarks/drop_in_step.py %s" % (
                   torch.get_num_threads(), " ".join(argv if argv is not None else sys.argv[1:])),
               "sizes": []}
    for label in tqdm(args.sizes, desc="model sizes"):
        results["sizes"].append(run_size(label, WIDTHS[label], args.repeats, args.functional_max, args.compile_max,
                                         not args.no_mlp_lopt, args.device))
        write_json(args.out, results)
    names = ["adam", "lstm", "lstm functional", "lstm compiled", "mlp_lopt"]
    rows = []
    for r in results["sizes"]:
        row = [r["model"], r["parameters"]]
        for k in names:
            s = r["seconds"].get(k)
            row.append("—" if s is None else f"{s * 1e3:.3g} ms ({s / r['seconds']['adam']:.3g}×)")
        row += [f"{r['matmul_flops_per_second'] / 1e9:.0f}", f"{r['memory_bytes_per_second'] / 1e9:.0f}",
                f"{r['lstm_lower_bound_seconds'] * 1e3:.3g} ms", f"{r['lstm_over_bound']:.2f}×",
                f"{r['lstm_over_bound_all_flops']:.2f}×"]
        rows.append(row)
    table = markdown_table(["model", "parameters", *[f"{k} (× adam)" for k in names], "matmul GFLOP/s",
                            "copy GB/s", "LSTM lower bound", "LSTM / bound",
                            "LSTM / bound with elementwise FLOPs"], rows)
    results["table"] = table
    print(table)
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
