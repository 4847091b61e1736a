"""Smoke test of the installed wheel in a virtual environment that holds torch alone."""

import importlib.util

import torch

import nanoadam
from nanoadam import NanoAdam, _cpu

nanoadam.show_config()
assert _cpu.available(), f"the wheel's CPU kernels do not load: {_cpu.status()}"
assert importlib.util.find_spec("transformers") is None, "this venv should hold torch alone"
assert importlib.util.find_spec("nanoadam_lab") is not None  # the lab ships in the wheel, its extras do not

torch.manual_seed(0)
start = torch.randn(50_000) * 0.1
params = {fused: torch.nn.Parameter(start.clone()) for fused in (True, False)}
opts = {fused: NanoAdam([p], lr=1e-2, density=0.1, mask_interval=3, fused=fused) for fused, p in params.items()}
for step in range(7):
    grad = torch.randn(50_000, generator=torch.Generator().manual_seed(step))
    for fused, p in params.items():
        p.grad = grad.clone()
        opts[fused].step()
torch.testing.assert_close(params[True], params[False], rtol=1e-4, atol=1e-6)
moved = (params[True] != start).float().mean().item()
assert 0.1 <= moved <= 0.35, moved  # the kept entries of 3 refreshes, nothing else
print(f"smoke test passed: kernels match the reference over 7 steps, {moved:.1%} of entries moved")
