"""Mixed precision: bf16 parameters (float32 math, stochastic rounding), fp16 with GradScaler, autocast."""

import pytest
import torch
from torch import nn

from nanoadam import NanoAdam, param_groups
from nanoadam.rounding import hash32, hash32_int, salt, stochastic_round_bf16


def noise(n, seed):
    return hash32(torch.arange(n), salt(seed, 1, 1)) & 0xFFFF


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    ulp = 2.0**-7  # bf16 spacing at 1.0
    x = torch.full((40_000,), 1.0 + 0.3 * ulp)
    rounded = stochastic_round_bf16(x, noise(x.numel(), 0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + ulp}
    mean_error = (rounded.mean() - x[0]).item()
    standard_error = ulp * (0.3 * 0.7 / x.numel()) ** 0.5
    assert abs(mean_error) < 4 * standard_error
    negative = stochastic_round_bf16(-x, noise(x.numel(), 1)).float()
    assert abs((negative.mean() + x[0]).item()) < 4 * standard_error
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0])
    out = stochastic_round_bf16(special, noise(4, 2)).float()
    assert out[0] == float("inf") and out[1] == float("-inf") and out[2].isnan() and out[3] == 0


def test_the_tensor_hash_is_its_plain_python_definition():
    """hash32 relies on int32 multiplication wrapping around; this would catch a platform where it does not."""
    gen = torch.Generator().manual_seed(0)
    positions = torch.cat([torch.randint(0, 2**62, (300,), generator=gen), torch.arange(2**31 - 3, 2**31 + 3),
                           torch.arange(2**32 - 3, 2**32 + 3), torch.tensor([0, 1, 2**63 - 1])])
    for salt_value in (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, salt(5, 77, 2)):
        expected = [hash32_int(int(p), salt_value) for p in positions]
        assert hash32(positions, salt_value).tolist() == expected


def test_the_hash_is_uniform_and_differs_between_salts():
    h = hash32(torch.arange(1 << 16), salt(0, 1, 1))
    assert int(h.min()) >= 0 and int(h.max()) < 1 << 32
    low = (h & 0xFFFF).float() / 65536
    assert abs(low.mean().item() - 0.5) < 0.01 and abs(low.var().item() - 1 / 12) < 0.005
    other = hash32(torch.arange(1 << 16), salt(0, 2, 1))
    assert (h == other).float().mean() < 0.001
    # 64-bit positions: entries beyond 2**32 hash apart from those below
    far = hash32(torch.arange(1 << 16) + (1 << 32), salt(0, 1, 1))
    assert (h == far).float().mean() < 0.001


@pytest.mark.parametrize("sparse", [True, False])
def test_updates_below_half_a_bf16_step_survive_only_with_stochastic_rounding(sparse):
    lr, steps = 1e-4, 200  # each Adam step ~lr, far below half the bf16 spacing at 1.0 (0.0039)
    drift = {}
    for rounding in (False, True):
        p = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = NanoAdam([{"params": [p], "sparse": sparse}], lr=lr, density=1.0, chunk_size=4096,
                       stochastic_rounding=rounding)
        for _ in range(steps):
            p.grad = torch.ones_like(p)
            opt.step()
        drift[rounding] = 1.0 - p.float().mean().item()
        assert opt.state[p]["exp_avg"].dtype == (torch.bfloat16 if sparse else torch.float32)
    assert drift[False] == 0.0  # round to nearest loses every update
    assert drift[True] == pytest.approx(lr * steps, rel=0.1)  # the float32 trajectory, on average


def test_bf16_parameters_do_float32_math_with_deterministic_rounding():
    """Same seeds, same result: stochastic rounding is reproducible (and so resumable)."""
    def run():
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(1000).bfloat16())
        opt = NanoAdam([p], lr=1e-3, density=0.2, chunk_size=100, stochastic_rounding=True)
        gen = torch.Generator().manual_seed(5)
        for _ in range(5):
            p.grad = torch.randn(1000, generator=gen).bfloat16()
            opt.step()
        return p.detach().clone()

    assert torch.equal(run(), run())


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 4))


def test_fp16_grad_scaler_skips_inf_steps_and_changes_nothing():
    model = small_model()
    opt = NanoAdam(param_groups(model), lr=1e-2, density=0.25, mask_interval=2, chunk_size=64)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))

    def scaled_step(poison=False):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if poison:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    for _ in range(3):
        scaled_step()
    weights = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(model.parameters())}
    step = opt.param_groups[0]["step"]
    scale = scaler.get_scale()
    scaled_step(poison=True)
    assert scaler.get_scale() < scale
    assert opt.param_groups[0]["step"] == step
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    for i, p in enumerate(model.parameters()):
        assert all(torch.equal(v, state[i][k]) for k, v in opt.state[p].items())
    scaled_step()
    assert opt.param_groups[0]["step"] == step + 1


def test_autocast_bf16_training_learns_and_keeps_unselected_entries():
    model = small_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = NanoAdam(param_groups(model), lr=1e-2, density=0.2, mask_interval=None, chunk_size=64)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 32, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    losses = []
    for _ in range(40):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    weight = model[0].weight
    selected = opt.masks()[weight]
    assert torch.equal(weight.detach()[~selected], start["0.weight"][~selected])
