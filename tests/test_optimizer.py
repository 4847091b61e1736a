"""NanoAdam as a torch.optim optimizer: the contract of DESIGN.md section 1 and 2."""

import copy
import io
import pickle

import pytest
import torch

from nanoadam import NanoAdam, _cpu
from nanoadam.selection import ChunkLayout, kept_per_chunk

FUSED = [False, pytest.param(None, marks=pytest.mark.skipif(not _cpu.available(), reason="no CPU kernels"))]
SHAPES = [(300, 7), (1000,), (64, 33, 3), (5,)]


def make_params(shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]


def clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(params, step, seed=100):
    gen = torch.Generator().manual_seed(seed + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def train(opt, params, steps, start=0):
    for t in range(start, start + steps):
        set_grads(params, t)
        opt.step()


# -- the algorithm --------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", FUSED)
def test_density_one_with_float32_moments_is_adamw(fused):
    ref = make_params()
    ours = clone(ref)
    adamw = torch.optim.AdamW(ref, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    nano = NanoAdam(ours, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, density=1.0,
                    state_dtype=torch.float32, chunk_size=100, mask_interval=3, fused=fused)
    for t in range(12):
        set_grads(ref, t)
        set_grads(ours, t)
        adamw.step()
        nano.step()
        for a, b in zip(ref, ours):
            if fused is False:  # the reference path performs AdamW's own operations
                assert torch.equal(a, b)
            else:  # the kernel's sqrt is correctly rounded, torch's is not always
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def brute_bottomk_positions(values, chunk_size, density):
    flat = values.reshape(-1).tolist()
    chosen = set()
    for start in range(0, len(flat), chunk_size):
        chunk = flat[start:start + chunk_size]
        k = kept_per_chunk(density, len(chunk))
        chosen.update(start + j for j in sorted(range(len(chunk)), key=lambda j: (abs(chunk[j]), j))[:k])
    return chosen


@pytest.mark.parametrize("fused", FUSED)
def test_changed_entries_are_exactly_the_chunk_bottomk(fused):
    params = make_params()
    opt = NanoAdam(params, lr=1e-3, density=0.07, chunk_size=128, mask_interval=2, weight_decay=0.5, fused=fused)
    for t in range(5):  # refreshes at t = 1, 3, 5
        before = [p.detach().clone() for p in params]
        set_grads(params, t)
        opt.step()
        if t % 2 == 0:
            for b, p in zip(before, params):
                changed = set(torch.nonzero((p.detach() != b).reshape(-1)).reshape(-1).tolist())
                assert changed == brute_bottomk_positions(b, 128, 0.07)


@pytest.mark.parametrize("fused", FUSED)
def test_unselected_entries_bitwise_unchanged_with_weight_decay(fused):
    params = make_params()
    start = [p.detach().clone() for p in params]
    opt = NanoAdam(params, lr=1e-2, density=0.05, mask_interval=None, weight_decay=1.0, chunk_size=200, fused=fused)
    train(opt, params, 10)
    for p, s in zip(params, start):
        selected = opt.masks()[p]
        assert torch.equal(p.detach()[~selected], s[~selected])
        assert (p.detach()[selected] != s[selected]).all()


def mask_history(opt, params, steps):
    history = []
    for t in range(steps):
        set_grads(params, t)
        opt.step()
        history.append(opt.state[params[0]]["index"].clone())
    return history


def test_refresh_timing_follows_mask_interval():
    params = make_params()
    opt = NanoAdam(params, lr=1e-3, density=0.1, mask_interval=3, selection="random", chunk_size=100)
    history = mask_history(opt, params, 8)
    changed_at = [t + 1 for t in range(1, 8) if not torch.equal(history[t], history[t - 1])]
    assert changed_at == [4, 7]  # refreshes at t = 1, 4, 7: (t - 1) % 3 == 0


def test_static_mask_never_changes():
    params = make_params()
    opt = NanoAdam(params, lr=1e-1, density=0.1, mask_interval=None, selection="random", chunk_size=100)
    history = mask_history(opt, params, 6)
    assert all(torch.equal(h, history[0]) for h in history)


def test_density_change_refreshes_at_once():
    params = make_params()
    opt = NanoAdam(params, lr=1e-3, density=0.2, mask_interval=None, chunk_size=100)
    train(opt, params, 2)
    assert opt.state[params[1]]["index"].numel() == 10 * 20
    opt.param_groups[0]["density"] = 0.1
    train(opt, params, 1, start=2)
    assert opt.state[params[1]]["index"].numel() == 10 * 10


@pytest.mark.parametrize("fused", FUSED)
def test_entries_kept_across_a_refresh_keep_their_moments(fused):
    params = make_params([(4000,)])
    opt = NanoAdam(params, lr=1e-2, density=0.2, mask_interval=4, chunk_size=500, state_dtype=torch.float32,
                   fused=fused)
    train(opt, params, 4)  # refreshes at t = 1; the next at t = 5
    p = params[0]
    state = opt.state[p]
    old_at = {int(i) + 500 * (j // 100): j for j, i in enumerate(state["index"].tolist())}
    old_m, old_v = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    set_grads(params, 4)
    g = p.grad.reshape(-1)
    opt.step()
    new_at = [int(i) + 500 * (j // 100) for j, i in enumerate(state["index"].tolist())]
    kept = [(j, old_at[q]) for j, q in enumerate(new_at) if q in old_at]
    assert 0 < len(kept) < len(new_at)
    j_new = torch.tensor([j for j, _ in kept])
    j_old = torch.tensor([i for _, i in kept])
    at = torch.tensor([new_at[j] for j, _ in kept])
    expected_m = old_m[j_old] + 0.1 * (g[at] - old_m[j_old])
    expected_v = 0.999 * old_v[j_old] + 0.001 * g[at] ** 2
    torch.testing.assert_close(state["exp_avg"][j_new], expected_m, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(state["exp_avg_sq"][j_new], expected_v, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("fused", FUSED)
def test_newly_selected_entries_step_at_most_lr(fused):
    lr = 1e-3
    params = make_params([(20_000,)])
    opt = NanoAdam(params, lr=lr, density=0.1, mask_interval=None, selection="random", chunk_size=1000, fused=fused)
    train(opt, params, 200)
    old = opt.masks()[params[0]].clone()
    opt.param_groups[0]["mask_interval"] = 1  # refresh at the next step; random: mostly new entries
    before = params[0].detach().clone()
    set_grads(params, 200)
    opt.step()
    new = opt.masks()[params[0]] & ~old
    step = (params[0].detach() - before).abs()[new]
    # Adam's first step is lr * |g| / (|g| + eps): the entry's own cohort, born at this step, gives
    # it Adam's bias correction for age 1 (tests/test_numerics.py follows it for 300 more steps).
    assert new.sum() > 1000
    assert step.max() <= lr * (1 + 1e-3)
    assert step.min() >= lr * 0.99


# -- torch.optim citizenship -------------------------------------------------------------------------


def test_closure_zero_grad_and_params_without_grad():
    params = make_params()
    frozen = params[3]
    opt = NanoAdam(params, lr=1e-2, density=0.5, chunk_size=64)
    before = frozen.detach().clone()

    def closure():
        opt.zero_grad()
        loss = sum((p**2).sum() for p in params[:3])
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert frozen.grad is None and torch.equal(frozen, before) and not opt.state[frozen]
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_add_param_group_and_per_group_hyperparameters():
    params = make_params()
    opt = NanoAdam(params[:2], lr=1e-2, density=0.1, chunk_size=100)
    train(opt, params[:2], 3)
    opt.add_param_group({"params": params[2:], "density": 0.5, "sparse": True})
    assert opt.param_groups[1]["step"] == 3 and opt.param_groups[1]["chunk_size"] == 100
    train(opt, params, 2, start=3)
    assert opt.param_groups[0]["step"] == opt.param_groups[1]["step"] == 5
    assert opt.state[params[2]]["index"].numel() == ChunkLayout.build(params[2].numel(), 100, 0.5).kept
    with pytest.raises(ValueError, match="density"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "density": 0.0})
    assert len(opt.param_groups) == 2


def test_dense_group_is_adamw():
    ref, ours = make_params(), make_params()
    adamw = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    nano = NanoAdam([{"params": ours, "sparse": False}], lr=1e-2, weight_decay=0.1)
    for t in range(5):
        set_grads(ref, t)
        set_grads(ours, t)
        adamw.step()
        nano.step()
    for a, b in zip(ref, ours):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert nano.state[ours[0]]["exp_avg"].dtype == torch.float32


def test_lr_scheduler_and_step_hooks():
    params = make_params()
    opt = NanoAdam(params, lr=1e-2, density=0.1, chunk_size=100)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    for t in range(4):
        set_grads(params, t)
        opt.step()
        sched.step()
    assert calls == ["pre", "post"] * 4
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_deepcopy_and_pickle_continue_identically():
    params = make_params()
    opt = NanoAdam(params, lr=1e-2, density=0.1, mask_interval=2, chunk_size=100)
    train(opt, params, 3)
    twin_params = clone(params)
    twin = NanoAdam(twin_params, lr=1e-2, density=0.1, mask_interval=2, chunk_size=100)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    restored = pickle.loads(pickle.dumps(opt.state_dict()))
    assert restored["state"][0]["exp_avg"].dtype == torch.bfloat16
    train(opt, params, 3, start=3)
    train(twin, twin_params, 3, start=3)
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("mask_interval,steps", [(3, 10), (1, 40)])  # 1: cohorts merge from step 17 on
def test_resume_is_bit_exact_across_refreshes(fused, mask_interval, steps):
    kw = dict(lr=1e-2, density=0.1, mask_interval=mask_interval, chunk_size=100, weight_decay=0.01, fused=fused)
    straight = make_params()
    opt = NanoAdam(straight, **kw)
    train(opt, straight, steps)

    half = steps // 2 + 3
    resumed = make_params()
    first = NanoAdam(resumed, **kw)
    train(first, resumed, half)
    buffer = io.BytesIO()
    torch.save({"model": [p.detach() for p in resumed], "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restarted = [torch.nn.Parameter(p.clone()) for p in saved["model"]]
    second = NanoAdam(restarted, **kw)
    second.load_state_dict(saved["opt"])
    assert second.state_bytes() == first.state_bytes()
    assert second.state[restarted[0]]["exp_avg"].dtype == torch.bfloat16
    train(second, restarted, steps - half, start=half)
    assert all(torch.equal(a, b) for a, b in zip(straight, restarted))
    for a, b in zip(straight, restarted):
        for key, value in opt.state[a].items():
            assert torch.equal(value, second.state[b][key]), key


def test_state_bytes_counts_every_tensor_and_meets_six_delta():
    p = torch.nn.Parameter(torch.randn(4096 * 100))
    opt = NanoAdam([p], density=0.1, chunk_size=4096)
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state[p]
    assert opt.state_bytes() == sum(v.numel() * v.element_size() for v in state.values())
    assert state["index"].dtype == torch.int16 and state["exp_avg"].dtype == torch.bfloat16
    assert opt.state_bytes() / p.numel() <= 0.62
    assert opt.state_bytes() >= 6 * 0.1 * p.numel()


# -- bad input -----------------------------------------------------------------------------------------

BAD_ARGS = [
    (dict(density=0.0), ValueError, "density"),
    (dict(density=1.5), ValueError, "density"),
    (dict(density="0.1"), TypeError, "density"),
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(betas=(1.0, 0.999)), ValueError, "beta"),
    (dict(betas=(0.9, -0.1)), ValueError, "beta"),
    (dict(betas=0.9), TypeError, "betas"),
    (dict(mask_interval=0), ValueError, "mask_interval"),
    (dict(mask_interval=2.5), TypeError, "mask_interval"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=True), TypeError, "chunk_size"),
    (dict(chunk_size=2**40), ValueError, "chunk_size"),  # aborted the process in the C++ kernel before
    (dict(selection="tiny_weights"), ValueError, "selection"),
    (dict(state_dtype=torch.int8), ValueError, "state_dtype"),
]


@pytest.mark.parametrize("kwargs,error,name", BAD_ARGS)
def test_bad_hyperparameters_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        NanoAdam(make_params(), **kwargs)
    with pytest.raises(error, match=name):  # per-group values too
        NanoAdam([{"params": make_params(), **kwargs}])


def test_complex_params_and_sparse_grads_are_refused():
    with pytest.raises(TypeError, match="complex"):
        NanoAdam([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    params = make_params()
    opt = NanoAdam(params, lr=1e-2, density=0.1, chunk_size=100)
    train(opt, params, 2)
    snapshot = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in params]
    set_grads(params, 2)
    params[2].grad = params[2].grad.to_sparse()
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()
    # nothing changed: not the weights, not the state, not the step counter
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    assert opt.param_groups[0]["step"] == 2
    assert all(torch.equal(opt.state_dict()["state"][i]["exp_avg"], snapshot["state"][i]["exp_avg"]) for i in range(4))


def test_load_state_dict_for_other_params_is_refused_and_changes_nothing():
    params = make_params()
    opt = NanoAdam(params, lr=1e-2, density=0.1, chunk_size=100)
    train(opt, params, 2)
    other = make_params([(30, 7), (1000,), (64, 33, 3), (5,)])
    other_opt = NanoAdam(other, lr=1e-2, density=0.1, chunk_size=100)
    train(other_opt, other, 1)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="other params"):
        opt.load_state_dict(other_opt.state_dict())
    with pytest.raises(ValueError, match="param group"):
        opt.load_state_dict(NanoAdam(params[:2]).state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][i]["index"], before["state"][i]["index"]) for i in range(4))
    train(opt, params, 1, start=2)  # still usable


def snapshot(opt, params):
    return copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]


def assert_unchanged(opt, params, before):
    state_dict, weights = before
    after = opt.state_dict()
    assert after["param_groups"] == state_dict["param_groups"]
    assert after["state"].keys() == state_dict["state"].keys()
    for pid, state in state_dict["state"].items():
        assert state.keys() == after["state"][pid].keys()
        for key, value in state.items():
            assert torch.equal(value, after["state"][pid][key]), (pid, key)
    assert all(torch.equal(p, w) for p, w in zip(params, weights))


def test_a_state_kind_error_in_a_later_group_changes_nothing_in_earlier_ones():
    """Before, the first group had already stepped when the second group's check fired."""
    params = make_params()
    opt = NanoAdam([{"params": params[:2]}, {"params": params[2:], "sparse": False}], lr=1e-2, chunk_size=100)
    train(opt, params, 2)
    before = snapshot(opt, params)
    set_grads(params, 2)
    for flags, match in (((True, True), "dense state"), ((False, False), "sparse NanoAdam state")):
        opt.param_groups[0]["sparse"], opt.param_groups[1]["sparse"] = flags
        with pytest.raises(ValueError, match=match):
            opt.step()
        opt.param_groups[0]["sparse"], opt.param_groups[1]["sparse"] = True, False
        assert_unchanged(opt, params, before)


def test_a_bad_gradient_in_a_later_group_changes_nothing():
    params = make_params()
    opt = NanoAdam([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2, chunk_size=100, mask_interval=1)
    train(opt, params, 2)
    before = snapshot(opt, params)
    set_grads(params, 2)
    params[3].grad = params[3].grad.to_sparse()  # the first group refreshes its masks at this step
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()
    assert_unchanged(opt, params, before)


def test_a_bad_hyperparameter_set_between_steps_changes_nothing():
    params = make_params()
    opt = NanoAdam([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2, chunk_size=100)
    train(opt, params, 2)
    before = snapshot(opt, params)
    opt.param_groups[1]["chunk_size"] = 2**40
    set_grads(params, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        opt.step()
    opt.param_groups[1]["chunk_size"] = 100
    assert_unchanged(opt, params, before)


def test_non_float_params_are_refused():
    with pytest.raises(TypeError, match="floating-point"):
        NanoAdam([torch.zeros(3, dtype=torch.int64)])


def test_bfloat16_and_non_contiguous_params_use_the_reference_path():
    base = torch.randn(40, 30)
    p16 = torch.nn.Parameter(base.clone().bfloat16())
    p_t = torch.nn.Parameter(base.clone().t())  # non-contiguous
    assert not p_t.is_contiguous()
    opt = NanoAdam([p16, p_t], lr=1e-2, density=0.1, chunk_size=100, weight_decay=0.1)
    start16, start_t = p16.detach().clone(), p_t.detach().clone()
    for _t in range(3):
        p16.grad = torch.randn(40, 30).bfloat16()
        p_t.grad = torch.randn(30, 40)
        opt.step()
    for p, start in ((p16, start16), (p_t, start_t)):
        selected = opt.masks()[p]
        assert torch.equal(p.detach()[~selected], start[~selected])
        assert (p.detach()[selected] != start[selected]).any()
    assert opt.state[p16]["exp_avg"].dtype == torch.bfloat16


def test_fused_true_refuses_what_the_kernels_cannot_do_before_changing_anything():
    p = torch.nn.Parameter(torch.randn(100).bfloat16())
    p.grad = torch.randn(100).bfloat16()
    opt = NanoAdam([p], fused=True)
    before = p.detach().clone()
    with pytest.raises((ValueError, RuntimeError), match="fused"):
        opt.step()
    assert torch.equal(p, before) and not opt.state[p] and opt.param_groups[0]["step"] == 0


def test_resume_with_bfloat16_params_keeps_int16_positions():
    """torch.optim casts every loaded state tensor to the parameter's dtype; bf16 cannot hold
    positions above 256 exactly, so NanoAdam restores the saved tensors instead."""
    kw = dict(lr=1e-2, density=0.1, mask_interval=4, chunk_size=4096)
    params = [torch.nn.Parameter(torch.randn(20_000).bfloat16())]
    opt = NanoAdam(params, **kw)
    for _t in range(3):
        params[0].grad = torch.randn(20_000).bfloat16()
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin = NanoAdam([torch.nn.Parameter(params[0].detach().clone())], **kw)
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in opt.state[params[0]].items():
        loaded = twin.state[twin.param_groups[0]["params"][0]][key]
        assert loaded.dtype == value.dtype and torch.equal(loaded, value), key
    assert int(opt.state[params[0]]["index"].max()) > 256


@pytest.mark.parametrize("fused", FUSED)
def test_empty_and_single_entry_params(fused):
    empty = torch.nn.Parameter(torch.zeros(0, 5))
    single = torch.nn.Parameter(torch.tensor([0.5]))
    opt = NanoAdam([empty, single], lr=0.1, density=0.1, fused=fused)
    for _ in range(3):
        empty.grad = torch.zeros(0, 5)
        single.grad = torch.tensor([1.0])
        opt.step()
    assert opt.state[empty]["index"].numel() == 0
    assert single.item() == pytest.approx(0.5 - 0.3, abs=1e-3)  # one entry: always selected, Adam steps of ~lr
