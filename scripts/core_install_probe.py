"""What `scripts/check-core-install` runs inside a venv holding only learnopt's core dependencies:
no extra installed, `lo.adam` through the drop-in equal to `torch.optim.Adam`, and
`learnopt.load_optimizer` stepping a model with the checkpoint given as the argument."""

import importlib.util
import sys

import torch

import learnopt
import learnopt.optim as lo

EXTRAS = ("lightning", "wandb", "scipy", "optuna", "sklearn", "matplotlib", "jsonargparse", "yaml")
installed = [m for m in EXTRAS if importlib.util.find_spec(m) is not None]
assert not installed, f"a core install pulled in extras: {installed}"

torch.manual_seed(0)
a, b = torch.nn.Linear(4, 2).double(), torch.nn.Linear(4, 2).double()
b.load_state_dict(a.state_dict())
mine, ref = lo.as_torch_optimizer(lo.adam(lr=1e-2), a.parameters()), torch.optim.Adam(b.parameters(), lr=1e-2)
x = torch.randn(8, 4, dtype=torch.float64)
for _ in range(5):
    for model, opt in ((a, mine), (b, ref)):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
for p, q in zip(a.parameters(), b.parameters()):
    torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)

model = torch.nn.Linear(4, 2)
opt = learnopt.load_optimizer(sys.argv[1], model.parameters())
before = [p.detach().clone() for p in model.parameters()]
model(torch.randn(8, 4)).pow(2).mean().backward()
opt.step()
assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before)), "the learned optimizer did not step"
print("core install: lo.adam matches torch.optim.Adam; load_optimizer steps; no extra installed or imported:",
      [m for m in EXTRAS if m in sys.modules] == [])
