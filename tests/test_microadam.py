"""The CPU port of MicroAdam (nanoadam_lab.baselines.microadam), checked against independent recomputations."""

import copy
import io
import math

import pytest
import torch

from nanoadam_lab.baselines.microadam import MicroAdam, dequantize, quantize, window_statistics

# A layout with several top-k blocks and a shorter tail block, several quantization buckets and a
# shorter last bucket, and an odd number of entries (the last byte of the error holds one code).
D, BLOCK, BUCKET, DENSITY = 1001, 128, 64, 0.05


# -- independent references -----------------------------------------------------------------------


def ref_dequantize(error, min_vals, max_vals, n, bucket):
    """Entry i: code in the high nibble of byte i // 2 when i is even, the low one when odd."""
    i = torch.arange(n)
    byte = error.long()[i // 2]
    code = torch.where(i % 2 == 0, byte >> 4, byte & 15).float()
    lo, hi = min_vals.float()[i // bucket], max_vals.float()[i // bucket]
    return lo + code * ((hi - lo) / 15)


def half_steps(min_vals, max_vals, n, bucket):
    i = torch.arange(n)
    return (max_vals.float()[i // bucket] - min_vals.float()[i // bucket]) / 30


def blocks_of(n, block_size):
    return [(start, min(start + block_size, n)) for start in range(0, n, block_size)]


def ref_topk_sets(a, block_size, density):
    """Per block, the set of in-block indices of the ceil(density * L) largest |a| (by sorting)."""
    sets = []
    for start, end in blocks_of(a.numel(), block_size):
        k = math.ceil(density * (end - start))
        order = torch.argsort(a[start:end].abs(), descending=True, stable=True)
        sets.append(set(order[:k].tolist()))
    return sets


def window_row_sets(opt, p, row, block_size, density):
    """The window row cut into its blocks: per block, (in-block index set, flat positions, values)."""
    st = opt.state[p]
    out, col = [], 0
    for start, end in blocks_of(p.numel(), block_size):
        k = math.ceil(density * (end - start))
        idx = st["I"][row, col : col + k].long()
        out.append((set(idx.tolist()), idx + start, st["V"][row, col : col + k]))
        col += k
    assert col == st["I"].shape[1]
    return out


def corrected_gradient(opt, p, grad, bucket):
    """a = grad + Qinv(e) from the optimizer's current state (e = 0 before the first step)."""
    st = opt.state.get(p)
    if not st:
        return grad.reshape(-1).float().clone()
    return grad.reshape(-1).float() + ref_dequantize(st["error"], st["min_vals"], st["max_vals"], p.numel(), bucket)


def scaled_grad(n, seed):
    """Gradients whose scale differs by four orders of magnitude across the tensor (per-bucket ranges matter)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) * torch.logspace(-3, 1, n)


# -- quantization ---------------------------------------------------------------------------------


def test_quantize_packs_codes_high_nibble_first():
    packed, lo, hi = quantize(torch.tensor([0.0, 15.0, 5.0, 10.0, 3.0, 3.0, 3.0]), bucket=4)
    assert packed.dtype == torch.uint8 and lo.dtype == hi.dtype == torch.bfloat16
    assert packed.tolist() == [0x0F, 0x5A, 0x00, 0x00]  # second bucket is constant: codes 0, odd tail
    assert lo.tolist() == [0.0, 3.0] and hi.tolist() == [15.0, 3.0]
    assert dequantize(packed, lo, hi, 7, 4).tolist() == [0.0, 15.0, 5.0, 10.0, 3.0, 3.0, 3.0]


def test_quantize_error_is_at_most_half_a_step_of_each_bucket():
    x = scaled_grad(D, seed=1)
    packed, lo, hi = quantize(x, BUCKET)
    assert packed.shape == ((D + 1) // 2,) and lo.shape == hi.shape == (math.ceil(D / BUCKET),)
    y = dequantize(packed, lo, hi, D, BUCKET)
    assert torch.equal(y, ref_dequantize(packed, lo, hi, D, BUCKET))
    assert torch.all((x - y).abs() <= half_steps(lo, hi, D, BUCKET) * (1 + 1e-5))
    # the stored range covers the bucket
    i = torch.arange(D)
    assert torch.all(lo.float()[i // BUCKET] <= x) and torch.all(x <= hi.float()[i // BUCKET])


def test_quantize_zeros_and_constant_buckets_are_exact():
    x = torch.cat([torch.zeros(64), torch.full((64,), -2.5), torch.zeros(3)])
    packed, lo, hi = quantize(x, 64)
    assert torch.equal(dequantize(packed, lo, hi, x.numel(), 64), x)


# -- the algorithm --------------------------------------------------------------------------------


def test_kept_values_plus_error_reproduce_the_corrected_gradient():
    p = torch.nn.Parameter(torch.randn(D))
    opt = MicroAdam([p], lr=1e-3, m=4, density=DENSITY, block_size=BLOCK, quant_bucket=BUCKET)
    for t in range(1, 6):
        grad = scaled_grad(D, seed=10 + t)
        a = corrected_gradient(opt, p, grad, BUCKET)
        p.grad = grad.clone()
        opt.step()
        assert torch.equal(p.grad, grad)  # the gradient is left alone
        st = opt.state[p]
        row = (t - 1) % 4
        recon = ref_dequantize(st["error"], st["min_vals"], st["max_vals"], D, BUCKET)
        kept = torch.zeros(D, dtype=torch.bool)
        for _, positions, values in window_row_sets(opt, p, row, BLOCK, DENSITY):
            recon[positions] += values.float()
            kept[positions] = True
        tol = half_steps(st["min_vals"], st["max_vals"], D, BUCKET) * (1 + 1e-5)
        tol = tol + torch.where(kept, a.abs() * 2.0**-8, 0.0)  # bf16 rounding of the kept values
        assert torch.all((recon - a).abs() <= tol), t
        # the error of the kept entries is the quantized zero, not their value
        e = ref_dequantize(st["error"], st["min_vals"], st["max_vals"], D, BUCKET)
        assert torch.all(e[kept].abs() <= half_steps(st["min_vals"], st["max_vals"], D, BUCKET)[kept] * (1 + 1e-5))


def test_window_holds_the_last_m_topk_sets_of_the_corrected_gradient():
    m, steps, betas = 3, 8, (0.8, 0.95)
    p = torch.nn.Parameter(torch.randn(D))
    opt = MicroAdam([p], lr=1e-3, betas=betas, m=m, density=DENSITY, block_size=BLOCK, quant_bucket=BUCKET)
    history = []
    for t in range(1, steps + 1):
        grad = scaled_grad(D, seed=100 + t)
        a = corrected_gradient(opt, p, grad, BUCKET)
        history.append((ref_topk_sets(a, BLOCK, DENSITY), a))
        p.grad = grad
        opt.step()
    st = opt.state[p]
    assert st["step"].item() == steps
    m_ref, v_ref = torch.zeros(D), torch.zeros(D)
    for age in range(m):
        t = steps - age
        expected_sets, a = history[t - 1]
        row = (t - 1) % m
        for (got, positions, values), want in zip(window_row_sets(opt, p, row, BLOCK, DENSITY), expected_sets):
            assert got == want, (t, row)
            assert torch.equal(values, a[positions].to(torch.bfloat16))
            m_ref[positions] += betas[0] ** age * values.float()
            v_ref[positions] += betas[1] ** age * values.float() ** 2
    m_hat, v_hat = window_statistics(st["I"], st["V"], steps, D, BLOCK, DENSITY, *betas)
    torch.testing.assert_close(m_hat, m_ref * (1 - betas[0]) / (1 - betas[0] ** steps), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(v_hat, v_ref * (1 - betas[1]) / (1 - betas[1] ** steps), rtol=1e-5, atol=1e-12)


SHAPES = [(300, 7), (1000,), (5,)]


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in SHAPES]


def clone(params, dtype=None):
    return [torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in params]


def set_grads(params, step, bf16_exact=False):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        g = torch.randn(p.shape, generator=gen)
        if bf16_exact:
            g = g.to(torch.bfloat16).float()
        p.grad = g.to(p.dtype)


HP = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)


@pytest.mark.parametrize("bf16_exact", [True, False])
def test_full_density_and_long_window_is_adamw(bf16_exact):
    steps = 6
    ref = make_params()
    ours = clone(ref)
    adamw = torch.optim.AdamW(ref, **HP)
    micro = MicroAdam(ours, **HP, m=steps, density=1.0, block_size=256)
    for t in range(steps):
        set_grads(ref, t, bf16_exact)
        set_grads(ours, t, bf16_exact)
        adamw.step()
        micro.step()
        for a, b in zip(ref, ours):
            if bf16_exact:  # the window stores the gradients exactly: only float rounding differs
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * HP["lr"])
            else:  # bf16 window values: the update of an entry is off by about 2^-8 relative
                torch.testing.assert_close(b, a, rtol=0, atol=(t + 1) * HP["lr"] * 2.0**-6)
    for p in ours:  # nothing is left over for the error feedback
        st = micro.state[p]
        assert not st["error"].any() and not st["min_vals"].any() and not st["max_vals"].any()


def test_full_density_short_window_forgets_old_gradients():
    """density 1, m = 2: Adam over the last two gradients only, weighted by age, bias-corrected by t."""
    m, steps, (b1, b2), lr, eps = 2, 5, HP["betas"], HP["lr"], HP["eps"]
    params = make_params()
    start = [p.detach().clone() for p in params]
    opt = MicroAdam(params, lr=lr, betas=(b1, b2), eps=eps, m=m, density=1.0, block_size=256)
    grads = []
    for t in range(1, steps + 1):
        set_grads(params, t, bf16_exact=True)
        grads.append([p.grad.clone() for p in params])
        before = [p.detach().clone() for p in params]
        opt.step()
        for i, p in enumerate(params):
            window = [grads[t - 1 - s][i] for s in range(min(t, m))]
            m_hat = sum(b1**s * g for s, g in enumerate(window)) * (1 - b1) / (1 - b1**t)
            v_hat = sum(b2**s * g * g for s, g in enumerate(window)) * (1 - b2) / (1 - b2**t)
            expected = before[i] - lr * m_hat / (v_hat.sqrt() + eps)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(p, s) for p, s in zip(params, start))


# -- memory ---------------------------------------------------------------------------------------


def test_state_bytes_match_the_layout():
    p = torch.nn.Parameter(torch.zeros(D))
    opt = MicroAdam([p], m=3, density=DENSITY, block_size=BLOCK, quant_bucket=BUCKET)
    p.grad = torch.randn(D)
    opt.step()
    # 7 blocks of 128 keep 7 each, the tail of 105 keeps 6: K = 55; 16 buckets; 501 bytes of codes
    assert opt.state[p]["I"].shape == opt.state[p]["V"].shape == (3, 55)
    assert MicroAdam.expected_state_bytes(D, 3, DENSITY, BLOCK, BUCKET) == 8 + 501 + 4 * 16 + 4 * 3 * 55
    assert opt.state_bytes() == 8 + 501 + 4 * 16 + 4 * 3 * 55


def test_state_bytes_of_a_large_tensor_are_about_point_96_bytes_per_weight():
    d = 2**20 + 37
    params = [torch.nn.Parameter(torch.zeros(d)), torch.nn.Parameter(torch.zeros(3, 5))]
    opt = MicroAdam(params)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    dtypes = {k: v.dtype for k, v in opt.state[params[0]].items()}
    assert dtypes == {"step": torch.int64, "error": torch.uint8, "min_vals": torch.bfloat16,
                      "max_vals": torch.bfloat16, "I": torch.int16, "V": torch.bfloat16}
    expected = sum(MicroAdam.expected_state_bytes(p.numel(), 10, 0.01, 4096, 64) for p in params)
    assert opt.state_bytes() == expected
    big = opt.state_bytes() - MicroAdam.expected_state_bytes(15, 10, 0.01, 4096, 64)
    assert abs(big - (0.5 * d + 4 * 10 * 0.01 * d + 4 * d / 64)) <= 0.01 * big


# -- state dict -----------------------------------------------------------------------------------


def mixed_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dt))
            for s, dt in [((300, 7), torch.float32), ((1000,), torch.bfloat16), ((77,), torch.float16)]]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_resume_through_torch_save_is_bit_exact():
    # block_size 512 puts in-block indices above 256, which a bf16 round trip could not hold
    hp = dict(lr=1e-2, weight_decay=0.1, m=3, density=0.05, block_size=512, quant_bucket=32)
    params = mixed_params()
    opt = MicroAdam(params, **hp)
    for t in range(4):
        set_grads(params, t)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    params2 = clone(params)
    opt2 = MicroAdam(params2, **hp)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for p, q in zip(params, params2):
        assert_same_state(opt.state[p], opt2.state[q])
        assert opt2.state[q]["step"].device.type == "cpu"
    for t in range(4, 9):
        set_grads(params, t)
        set_grads(params2, t)
        opt.step()
        opt2.step()
    for p, q in zip(params, params2):
        assert p.dtype == q.dtype and torch.equal(p, q)
        assert_same_state(opt.state[p], opt2.state[q])


def test_loading_a_live_state_dict_does_not_share_tensors():
    params = mixed_params()
    opt = MicroAdam(params, m=2, block_size=512)
    set_grads(params, 0)
    opt.step()
    snapshot = copy.deepcopy(opt.state_dict())
    params2 = clone(params)
    opt2 = MicroAdam(params2, m=2, block_size=512)
    opt2.load_state_dict(opt.state_dict())
    set_grads(params2, 1)
    opt2.step()
    for i, p in enumerate(params):
        assert_same_state(opt.state[p], snapshot["state"][i])


# -- checks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(lr="fast"), TypeError, "lr"),
        (dict(eps=-1e-8), ValueError, "eps"),
        (dict(weight_decay=float("nan")), ValueError, "weight_decay"),
        (dict(betas=(1.0, 0.9)), ValueError, "betas"),
        (dict(betas=(0.9,)), TypeError, "betas"),
        (dict(m=0), ValueError, "m"),
        (dict(m=2.0), TypeError, "m"),
        (dict(density=0.0), ValueError, "density"),
        (dict(density=1.5), ValueError, "density"),
        (dict(density="1%"), TypeError, "density"),
        (dict(block_size=0), ValueError, "block_size"),
        (dict(block_size=32769), ValueError, "block_size"),
        (dict(block_size=True), TypeError, "block_size"),
        (dict(quant_bucket=0), ValueError, "quant_bucket"),
        (dict(quant_bucket=64.0), TypeError, "quant_bucket"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, exc, name):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(exc, match=f"Invalid {name}:"):
        MicroAdam([p], **kwargs)
    opt = MicroAdam([p])
    with pytest.raises(exc, match=f"Invalid {name}:"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], **kwargs})


def test_block_size_at_the_int16_limit_is_accepted():
    p = torch.nn.Parameter(torch.zeros(40000))
    opt = MicroAdam([p], block_size=32768, density=0.001)
    p.grad = torch.randn(40000)
    opt.step()
    assert int(opt.state[p]["I"].max()) < 32768


def test_complex_params_and_sparse_grads_are_refused_before_any_change():
    with pytest.raises(TypeError, match="complex"):
        MicroAdam([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    dense, sparse = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = MicroAdam([dense, sparse], lr=0.1)
    dense.grad = torch.ones(4)
    sparse.grad = torch.ones(4).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(dense, torch.ones(4)) and not opt.state_dict()["state"]
    # a group made invalid after construction is refused at the step, before any change
    sparse.grad = None
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid lr:"):
        opt.step()
    assert torch.equal(dense, torch.ones(4)) and opt.state_bytes() == 0


def test_layout_cannot_change_after_the_first_step():
    p = torch.nn.Parameter(torch.zeros(100))
    opt = MicroAdam([p], m=2)
    p.grad = torch.randn(100)
    opt.step()
    opt.param_groups[0]["m"] = 3
    with pytest.raises(ValueError, match="cannot change"):
        opt.step()


def test_params_without_grad_are_skipped():
    with_grad, without = torch.nn.Parameter(torch.ones(50)), torch.nn.Parameter(torch.ones(50))
    opt = MicroAdam([with_grad, without], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        with_grad.grad = torch.randn(50)
        opt.step()
    assert torch.equal(without, torch.ones(50)) and without not in opt.state
    assert not torch.equal(with_grad, torch.ones(50))
    assert opt.state[with_grad]["step"].item() == 3
    assert opt.state_bytes() == MicroAdam.expected_state_bytes(50)
    # a parameter that gets its first gradient later starts its own count
    without.grad = torch.randn(50)
    opt.step()
    assert opt.state[without]["step"].item() == 1 and opt.state[with_grad]["step"].item() == 4


def test_closure_loss_is_returned_and_bf16_params_train():
    w = torch.nn.Parameter(torch.randn(256, dtype=torch.bfloat16))
    opt = MicroAdam([w], lr=0.05, density=0.1, block_size=64)

    def closure():
        opt.zero_grad()
        loss = (w.float() ** 2).sum()
        loss.backward()
        return loss

    first = closure().item()
    for _ in range(30):
        loss = opt.step(closure)
    assert w.dtype == torch.bfloat16 and loss.item() < first
