"""The Triton kernels against the eager reference, on the CPU under the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before ``nanoadam.triton_kernels`` defines its kernels, so it is
set here before anything imports Triton; the module is skipped where Triton is not installed.
Tensors stay small: the interpreter runs every program in numpy.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanoadam import NanoAdam, functional  # noqa: E402
from nanoadam import triton_kernels as tk  # noqa: E402
from nanoadam.cohorts import Merge  # noqa: E402
from nanoadam.functional import REFERENCE, TRITON, Mask, RefreshTerms, UpdateTerms, refresh_masks, sparse_adamw  # noqa: E402,E501
from nanoadam.selection import (  # noqa: E402
    ChunkLayout,
    chunk_bottomk,
    cohort_ids,
    kept_mask,
    pack_index,
    random_keys,
    selection_keys,
)

if "Interpreted" not in type(tk._sparse_adamw_kernel).__name__:  # imported before the variable was set
    tk = importlib.reload(tk)

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_state(numel, chunk_size, density, gen, param_dtype, state_dtype, cohorts=4):
    layout = ChunkLayout.build(numel, chunk_size, density)
    param = torch.randn(numel, generator=gen).to(param_dtype)
    grad = torch.randn(numel, generator=gen).to(param_dtype)
    pos = chunk_bottomk(selection_keys(param, "small_weights"), layout)
    cohort = torch.randint(0, cohorts, (layout.kept,), generator=gen) * 5  # 0, 5, 10, 15: high bits set
    m = (torch.randn(layout.kept, generator=gen) * 1e-2).to(state_dtype)
    v = (torch.rand(layout.kept, generator=gen) * 1e-4).to(state_dtype)
    return param, grad, Mask(pack_index(pos, cohort, layout), m, v, layout)


def update_terms(step, offset=0, round_params=False, seed=9):
    born = [1, 0, 0, 0, 0, 3, 0, 0, 0, 0, step - 1, 0, 0, 0, 0, step]
    ages = [step - b + 1 if b else 1 for b in born]
    bias = tuple([HYPER["lr"] / (1 - 0.9**a) for a in ages] + [(1 - 0.999**a) ** 0.5 for a in ages])
    return UpdateTerms(bias, seed, step, round_params, offset)


def clone_mask(mask):
    return Mask(mask.index.clone(), mask.exp_avg.clone(), mask.exp_avg_sq.clone(), mask.layout)


def tied_values(numel, gen):
    """Few distinct magnitudes of both signs, so ties are everywhere."""
    return (torch.randint(-4, 5, (numel,), generator=gen) * 0.5).float()


# ------------------------------------------------------------------------------------------------
# Update
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_update_matches_reference(param_dtype, state_dtype, monkeypatch):
    monkeypatch.setattr(tk, "_UPDATE_BLOCK", 64)  # many blocks per tensor: the block -> tensor search
    gen = torch.Generator().manual_seed(0)
    # Full chunks and a partial last one, two chunk sizes, one tensor at another step (2nd launch).
    shapes = [(3000 + 37, 256, 0.1), (1000 + 5, 64, 0.25), (64 * 3, 64, 0.5), (700, 256, 0.1)]
    terms = [update_terms(7, offset=11), update_terms(7), update_terms(7, round_params=True), update_terms(30, 2**33)]
    states = [make_state(*s, gen, param_dtype, state_dtype) for s in shapes]
    ref_p = [p.clone() for p, _, _ in states]
    ref_m = [clone_mask(m) for _, _, m in states]
    got_p = [p.clone() for p, _, _ in states]
    got_m = [clone_mask(m) for _, _, m in states]
    grads = [g for _, g, _ in states]
    for p, g, m, t in zip(ref_p, grads, ref_m, terms):
        functional._reference_sparse_adamw(p, g, m, t, **HYPER)
    tk.sparse_adamw_triton(got_p, grads, got_m, terms, **HYPER)

    p_tol = dict(rtol=8e-3, atol=1e-6) if param_dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-9)
    s_tol = dict(rtol=8e-3, atol=1e-12) if state_dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-12)
    for (before, _, mask), rp, gp, rm, gm in zip(states, ref_p, got_p, ref_m, got_m):
        selected = kept_mask(mask.index, mask.layout)
        assert torch.equal(gp[~selected], before[~selected])  # bitwise unchanged, no weight decay either
        assert (gp[selected] != before[selected]).any()
        torch.testing.assert_close(gp, rp, **p_tol)
        torch.testing.assert_close(gm.exp_avg.float(), rm.exp_avg.float(), **s_tol)
        torch.testing.assert_close(gm.exp_avg_sq.float(), rm.exp_avg_sq.float(), **s_tol)
        assert gm.exp_avg.dtype == state_dtype and gp.dtype == param_dtype
        assert (gm.exp_avg_sq.float() >= 0).all()
        assert torch.equal(gm.index, mask.index)
        if state_dtype == torch.bfloat16:  # the same random bits: nearly every entry rounds alike
            assert (gm.exp_avg_sq == rm.exp_avg_sq).float().mean() > 0.99


def test_update_float32_matches_the_reference_to_an_ulp():
    """numpy (the interpreter) and torch's vectorized math may round sqrt and division apart by an
    ulp on some CPUs (they did on AMD EPYC), so this compares values, not bits."""
    gen = torch.Generator().manual_seed(1)
    param, grad, mask = make_state(2048 + 100, 256, 0.1, gen, torch.float32, torch.float32)
    ref_p, got_p, ref_m, got_m = param.clone(), param.clone(), clone_mask(mask), clone_mask(mask)
    functional._reference_sparse_adamw(ref_p, grad, ref_m, update_terms(5), **HYPER)
    tk.sparse_adamw_triton([got_p], [grad], [got_m], [update_terms(5)], **HYPER)
    torch.testing.assert_close(got_p, ref_p, rtol=2e-7, atol=1e-6 * HYPER["lr"])
    torch.testing.assert_close(got_m.exp_avg, ref_m.exp_avg, rtol=2e-7, atol=0)
    torch.testing.assert_close(got_m.exp_avg_sq, ref_m.exp_avg_sq, rtol=2e-7, atol=0)


def test_update_rejects_what_it_cannot_serve():
    gen = torch.Generator().manual_seed(2)
    param, grad, mask = make_state(512, 64, 0.1, gen, torch.float64, torch.float32)
    with pytest.raises(ValueError, match="float32/bfloat16"):
        tk.sparse_adamw_triton([param], [grad], [mask], [update_terms(1)], **HYPER)
    assert not tk.tensor_applies(param, grad, torch.float32)
    assert not tk.tensor_applies(param.half(), grad.half(), torch.float32)  # fp16: the reference path


# ------------------------------------------------------------------------------------------------
# Bottom-k
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel,chunk_size,density", [
    (3000, 256, 0.1), (1000 + 7, 64, 0.3), (64 * 5, 64, 1.0), (999, 100, 0.01), (2 * 4096 + 50, 4096, 0.1),
])
@pytest.mark.parametrize("selection", ["small_weights", "large_weights", "large_gradients"])
@pytest.mark.parametrize("kind", ["random", "tied"])
def test_bottomk_is_exactly_the_reference(numel, chunk_size, density, selection, kind):
    gen = torch.Generator().manual_seed(numel)
    values = torch.randn(numel, generator=gen) if kind == "random" else tied_values(numel, gen)
    layout = ChunkLayout.build(numel, chunk_size, density)
    expected = chunk_bottomk(selection_keys(values, selection), layout)
    got = tk.chunk_bottomk_triton(values, layout, selection)
    assert got.dtype == expected.dtype == torch.int16
    assert torch.equal(got, expected)


def test_bottomk_of_keys_bf16_and_special_values():
    gen = torch.Generator().manual_seed(3)
    layout = ChunkLayout.build(1000, 128, 0.2)
    keys = random_keys(1000, 11, 0, torch.device("cpu"))
    assert torch.equal(tk.chunk_bottomk_triton(keys, layout), chunk_bottomk(keys, layout))
    values = torch.randn(1000, generator=gen).bfloat16()
    for sel in ("small_weights", "large_weights"):
        assert torch.equal(tk.chunk_bottomk_triton(values, layout, sel), chunk_bottomk(selection_keys(values, sel),
                                                                                        layout))
    special = torch.randn(1000, generator=gen)
    special[::7] = 0.0
    special[1::7] = -0.0
    special[2::11] = float("inf")
    special[3::13] = float("nan")
    for sel in ("small_weights", "large_weights"):
        assert torch.equal(tk.chunk_bottomk_triton(special, layout, sel),
                           chunk_bottomk(selection_keys(special, sel), layout))


def test_bottomk_long_chunks_fall_back_to_the_reference():
    gen = torch.Generator().manual_seed(4)
    values = torch.randn(10_000, generator=gen)
    layout = ChunkLayout.build(10_000, tk.MAX_TRITON_CHUNK + 1, 0.05)
    got = tk.chunk_bottomk_triton(values, layout, "small_weights")
    assert torch.equal(got, chunk_bottomk(selection_keys(values, "small_weights"), layout))
    with pytest.raises(ValueError, match="random"):
        tk.chunk_bottomk_triton(values, layout, "random")


# ------------------------------------------------------------------------------------------------
# Refresh and the dispatch in functional.py
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("selection", ["small_weights", "large_gradients", "random"])
@pytest.mark.parametrize("new_density", [0.1, 0.2])
def test_refresh_matches_reference(selection, new_density):
    gen = torch.Generator().manual_seed(5)
    param, grad, old = make_state(2000 + 33, 256, 0.1, gen, torch.float32, torch.bfloat16)
    at = kept_mask(old.index, old.layout)
    param[at] += torch.randn(int(at.sum()), generator=gen) * 0.5  # kept entries moved since the last refresh
    layout = ChunkLayout.build(param.numel(), 256, new_density)
    kw = dict(selection=selection, state_dtype=torch.bfloat16)
    terms = RefreshTerms(10, Merge(10, 5, 1.5, 2.5), 21, 22, 4096)
    ref = functional._reference_refresh(param, grad, clone_mask(old), layout, terms, **kw)
    got = tk.refresh_triton([param], [grad], [clone_mask(old)], [layout], [terms], **kw)[0]
    assert torch.equal(got.index, ref.index)
    assert torch.equal(got.exp_avg, ref.exp_avg) and torch.equal(got.exp_avg_sq, ref.exp_avg_sq)
    assert (cohort_ids(got.index, layout) == 10).any() and (cohort_ids(got.index, layout) == 5).any()


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Makes functional.py dispatch CPU tensors to the Triton kernels (run by the interpreter) and
    counts the calls."""
    calls = {"update": 0, "refresh": 0}
    update, refresh = tk.sparse_adamw_triton, tk.refresh_triton

    def counted_update(*a, **k):
        calls["update"] += 1
        return update(*a, **k)

    def counted_refresh(*a, **k):
        calls["refresh"] += 1
        return refresh(*a, **k)

    monkeypatch.setattr(functional, "_TRITON_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(functional, "_TRITON_BROKEN", [])
    monkeypatch.setattr(tk, "triton_available", lambda: True)
    monkeypatch.setattr(tk, "sparse_adamw_triton", counted_update)
    monkeypatch.setattr(tk, "refresh_triton", counted_refresh)
    return calls


def test_dispatch_serves_eligible_tensors_and_leaves_the_rest(triton_on_cpu):
    gen = torch.Generator().manual_seed(6)
    p32, g32, m32 = make_state(1500, 256, 0.1, gen, torch.float32, torch.bfloat16)
    p64, g64, m64 = make_state(1500, 256, 0.1, gen, torch.float64, torch.bfloat16)  # reference path
    params, masks = [p32.clone(), p64.clone()], [clone_mask(m32), clone_mask(m64)]
    ref_params, ref_masks = [p32.clone(), p64.clone()], [clone_mask(m32), clone_mask(m64)]
    impls = [functional.implementation(p, g, torch.bfloat16, "small_weights", None)
             for p, g in ((p32, g32), (p64, g64))]
    assert impls == [TRITON, REFERENCE]
    terms = [update_terms(3), update_terms(3)]
    sparse_adamw(params, [g32, g64], masks, terms, impls, **HYPER)
    assert triton_on_cpu["update"] == 1
    sparse_adamw(ref_params, [g32, g64], ref_masks, terms, [REFERENCE] * 2, **HYPER)
    assert triton_on_cpu["update"] == 1  # the reference only
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * HYPER["lr"])

    layouts = [ChunkLayout.build(1500, 256, 0.2)] * 2
    kw = dict(selection="small_weights", state_dtype=torch.bfloat16)
    rterms = [RefreshTerms(1, None, 0, 0, 0)] * 2
    got = refresh_masks(params, [g32, g64], masks, layouts, rterms, impls, **kw)
    assert triton_on_cpu["refresh"] == 1
    ref = refresh_masks(params, [g32, g64], masks, layouts, rterms, [REFERENCE] * 2, **kw)
    for a, b in zip(got, ref):
        assert torch.equal(a.index, b.index) and torch.equal(a.exp_avg_sq, b.exp_avg_sq)


def test_a_triton_failure_falls_back_to_the_reference_with_one_warning(triton_on_cpu, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("PTX compile failed (simulated)")

    monkeypatch.setattr(tk, "sparse_adamw_triton", broken)
    torch.manual_seed(0)
    model = torch.nn.Linear(40, 30)
    twin = torch.nn.Linear(40, 30)
    twin.load_state_dict(model.state_dict())
    kw = dict(lr=1e-2, density=0.2, mask_interval=2, chunk_size=64)
    opt, ref_opt = NanoAdam(model.parameters(), **kw), NanoAdam(twin.parameters(), fused=False, **kw)
    x = torch.randn(16, 40)
    with pytest.warns(RuntimeWarning, match="Triton kernels failed") as record:
        for _ in range(3):
            for net, o in ((model, opt), (twin, ref_opt)):
                o.zero_grad()
                net(x).square().mean().backward()
                o.step()
    assert len([w for w in record if "Triton" in str(w.message)]) == 1
    assert functional.implementation(model.weight, model.weight.grad, torch.bfloat16, None, None) != TRITON
    for a, b in zip(model.parameters(), twin.parameters()):  # after the failure: the CPU kernel here
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_optimizer_through_the_triton_path_matches_the_reference(triton_on_cpu):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
    twin = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
    twin.load_state_dict(model.state_dict())
    kw = dict(lr=1e-2, density=0.2, mask_interval=2, chunk_size=64, weight_decay=0.1)
    opt, ref_opt = NanoAdam(model.parameters(), **kw), NanoAdam(twin.parameters(), fused=False, **kw)
    x, y = torch.randn(16, 40), torch.randn(16, 5)
    for _ in range(4):
        for net, o in ((model, opt), (twin, ref_opt)):
            o.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            o.step()
    assert triton_on_cpu["update"] >= 4 and triton_on_cpu["refresh"] >= 2
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fused_true_refuses_an_fp16_gpu_parameter_before_changing_anything(triton_on_cpu):
    """The Triton kernels serve float32 and bf16; fp16 failed only after masks and counters moved."""
    p32 = torch.nn.Parameter(torch.randn(500))
    p16 = torch.nn.Parameter(torch.randn(500).half())
    opt = NanoAdam([{"params": [p32]}, {"params": [p16]}], lr=1e-2, chunk_size=100, fused=True)
    p32.grad, p16.grad = torch.randn(500), torch.randn(500).half()
    before = (p32.detach().clone(), p16.detach().clone())
    with pytest.raises(ValueError, match="fused=True"):
        opt.step()
    assert torch.equal(p32, before[0]) and torch.equal(p16, before[1])
    assert not opt.state and opt.param_groups[0]["step"] == 0
    assert triton_on_cpu["update"] == triton_on_cpu["refresh"] == 0


# ------------------------------------------------------------------------------------------------
# Many steps through the Triton path (shorter than tests/test_numerics.py: the interpreter is slow)
# ------------------------------------------------------------------------------------------------


def test_bf16_second_moments_decay_through_the_triton_path(triton_on_cpu):
    from test_numerics import update_after_decay

    # 700 quiet steps: float32 v falls from 0.095 to 0.052; round to nearest kept it at 0.0977
    exact, _ = update_after_decay(torch.float32, False, entries=1, quiet=700)
    ours, _ = update_after_decay(torch.bfloat16, None, entries=64, quiet=700)
    assert triton_on_cpu["update"] >= 800
    ratio = ours / exact
    assert ratio.min() > 0.85 and ratio.max() < 1.15


@pytest.mark.parametrize("name", ["small first gradient", "spike first gradient", "alternating gradient"])
def test_a_late_selected_entry_moves_like_a_fresh_adam_through_the_triton_path(triton_on_cpu, name):
    from test_numerics import PATTERNS, fresh_adam_moves, late_entry_moves

    ours = late_entry_moves(PATTERNS[name], 200, None, join=201, after=100)
    fresh = fresh_adam_moves(PATTERNS[name], after=100)
    assert triton_on_cpu["refresh"] >= 2
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(fresh), rtol=1e-4, atol=1e-9)
