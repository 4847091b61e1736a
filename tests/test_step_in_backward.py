"""Step in backward: each parameter updated by its gradient hook, bit for bit like step()."""

import pytest
import torch
from torch import nn

from nanoadam import NanoAdam, param_groups

KW = dict(lr=1e-2, density=0.2, mask_interval=3, chunk_size=64, weight_decay=0.01)


def model(dtype=torch.float32):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 3))
    return net.to(dtype)


def groups(net, **kw):
    return param_groups(net, head_names=("5",), **kw)  # the last Linear is the head


def batch(i):
    gen = torch.Generator().manual_seed(i)
    return torch.randn(16, 20, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def loss_of(net, i):
    x, y = batch(i)
    return nn.functional.cross_entropy(net(x.to(net[0].weight.dtype)).float(), y)


def clip_each(net, max_norm):
    for p in net.parameters():
        if p.grad is not None:
            norm = torch.linalg.vector_norm(p.grad)
            p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))


@pytest.mark.parametrize("accumulation,clip,dtype", [(1, None, torch.float32), (2, None, torch.float32),
                                                    (1, 0.05, torch.float32), (1, None, torch.bfloat16)])
def test_same_weights_as_ordinary_step(accumulation, clip, dtype):
    """bf16 weights with stochastic rounding: the random bits come from the step being taken
    (they came from the previous one in backward before)."""
    ordinary, hooked = model(dtype), model(dtype)
    kw = dict(KW, stochastic_rounding=dtype == torch.bfloat16)
    opt_a = NanoAdam(groups(ordinary), **kw)
    opt_b = NanoAdam(groups(hooked), **kw)
    opt_b.step_in_backward(gradient_accumulation_steps=accumulation, max_grad_norm_per_tensor=clip)
    for i in range(8 * accumulation):
        loss_of(ordinary, i).backward()
        if (i + 1) % accumulation == 0:
            if clip:
                clip_each(ordinary, clip)
            opt_a.step()
            opt_a.zero_grad()
        loss_of(hooked, i).backward()
        if (i + 1) % accumulation:
            assert hooked[0].weight.grad is not None  # still accumulating
        else:
            assert all(p.grad is None for p in hooked.parameters())  # consumed and freed
    for (name, a), b in zip(ordinary.named_parameters(), hooked.parameters()):
        assert torch.equal(a, b), name
    assert opt_a.param_groups[0]["step"] == opt_b.param_groups[0]["step"] == 8
    for a, b in zip(ordinary.parameters(), hooked.parameters()):
        assert all(torch.equal(v, opt_b.state[b][k]) for k, v in opt_a.state[a].items())


def test_step_refuses_and_stop_restores():
    net = model()
    opt = NanoAdam(groups(net), **KW)
    opt.step_in_backward()
    loss_of(net, 0).backward()
    with pytest.raises(RuntimeError, match="during backward"):
        opt.step()
    opt.stop_step_in_backward()
    loss_of(net, 1).backward()
    assert net[0].weight.grad is not None
    opt.step()
    assert opt.param_groups[0]["step"] == 2


@pytest.mark.parametrize("kwargs,match", [(dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
                                          (dict(max_grad_norm_per_tensor=-1.0), "max_grad_norm_per_tensor")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NanoAdam(model().parameters()).step_in_backward(**kwargs)


def test_memory_benchmarks_fix_the_allocator_for_every_process(monkeypatch):
    import json
    import subprocess

    from nanoadam_lab._io import measurement_env
    from nanoadam_lab.bench import backward

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert "MALLOC_MMAP_THRESHOLD_" not in measurement_env(None)
    envs = []
    real_run = subprocess.run

    def fake_run(cmd, env=None, **kwargs):
        if "nanoadam_lab.bench.backward" not in cmd:
            return real_run(cmd, env=env, **kwargs)
        envs.append(env)
        row = {"setting": cmd[3], "optimizer": cmd[4], "params": 1, "peak_training_mb": 2.0, "model_mb": 1.0,
               "increase_over_model_mb": 1.0}
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(row), stderr="")

    monkeypatch.setattr(backward.subprocess, "run", fake_run)
    result = backward.run(backward.BackwardBenchConfig(settings=["minilm"], mmap_threshold=65536))
    assert [e["MALLOC_MMAP_THRESHOLD_"] for e in envs] == ["65536"] * len(backward.OPTIMIZERS)
    assert "MALLOC_MMAP_THRESHOLD_=65536" in backward.format_table(result)
