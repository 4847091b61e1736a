"""The math on flat tensors: masks against brute force, fused kernels against the reference."""

import pytest
import torch

from nanoadam import _cpu
from nanoadam.functional import NEW_ENTRY, Mask, refresh_masks, sparse_adamw
from nanoadam.selection import ChunkLayout, chunk_bottomk, global_positions, kept_per_chunk, selection_keys

needs_kernels = pytest.mark.skipif(not _cpu.available(), reason="compiled CPU kernels not installed")
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def brute_force_bottomk(values, chunk_size, density, largest=False):
    """Per chunk, sort (|x|, position) in plain Python and keep the first k positions."""
    flat = values.reshape(-1).tolist()
    out = []
    for start in range(0, len(flat), chunk_size):
        chunk = flat[start:start + chunk_size]
        k = kept_per_chunk(density, len(chunk))
        order = sorted(range(len(chunk)), key=lambda j: ((-abs(chunk[j])) if largest else abs(chunk[j]), j))
        out += [start + j for j in sorted(order[:k])]
    return out


def tied_values(numel, gen):
    """Few distinct magnitudes of both signs, so ties are everywhere."""
    return (torch.randint(-6, 7, (numel,), generator=gen) * 0.25).float()


def test_kept_per_chunk_is_exact():
    assert kept_per_chunk(0.3, 10) == 3  # 0.3 * 10 is 3.0000000000000004 in floats
    assert kept_per_chunk(0.1, 4096) == 410
    assert kept_per_chunk(1e-9, 7) == 1
    assert kept_per_chunk(1.0, 7) == 7


@pytest.mark.parametrize("numel,chunk_size,density", [(1000, 64, 0.1), (1000, 1000, 0.3), (77, 100, 0.5),
                                                      (4096 * 3 + 5, 4096, 0.1), (50, 7, 1.0)])
@pytest.mark.parametrize("largest", [False, True])
def test_reference_selection_is_brute_force_bottomk(numel, chunk_size, density, largest):
    gen = torch.Generator().manual_seed(numel)
    for values in (torch.randn(numel, generator=gen), tied_values(numel, gen)):
        layout = ChunkLayout.build(numel, chunk_size, density)
        keys = selection_keys(values, "large_weights" if largest else "small_weights")
        got = global_positions(chunk_bottomk(keys, layout), layout).tolist()
        assert got == brute_force_bottomk(values, chunk_size, density, largest)
        assert len(got) == layout.kept


def test_layout_index_dtype_and_counts():
    small = ChunkLayout.build(10_000, 4096, 0.1)
    assert small.index_dtype == torch.int16 and small.kept == 2 * 410 + 181
    big = ChunkLayout.build(100_000, 40_000, 0.1)
    assert big.index_dtype == torch.int32 and big.kept == 2 * 4000 + 2000


def random_state(numel, chunk_size, density, gen, state_dtype=torch.bfloat16, new_fraction=0.0):
    layout = ChunkLayout.build(numel, chunk_size, density)
    param = torch.randn(numel, generator=gen)
    index = chunk_bottomk(selection_keys(param, "small_weights"), layout)
    m = (torch.randn(layout.kept, generator=gen) * 1e-3).to(state_dtype)
    v = (torch.rand(layout.kept, generator=gen) * 1e-6).to(state_dtype)
    if new_fraction:
        v[torch.rand(layout.kept, generator=gen) < new_fraction] = NEW_ENTRY
    return param, Mask(index, m, v, layout)


def clone_mask(mask):
    return Mask(mask.index.clone(), mask.exp_avg.clone(), mask.exp_avg_sq.clone(), mask.layout)


@needs_kernels
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk_size", [256, 40_000])
def test_fused_update_matches_reference(state_dtype, chunk_size):
    gen = torch.Generator().manual_seed(1)
    numel = 100_003
    param, mask = random_state(numel, chunk_size, 0.1, gen, state_dtype, new_fraction=0.2)
    grad = torch.randn(numel, generator=gen)
    ref_p, fast_p = param.clone(), param.clone()
    ref_m, fast_m = clone_mask(mask), clone_mask(mask)
    sparse_adamw([ref_p], [grad], [ref_m], [7.0], fused=False, **HYPER)
    sparse_adamw([fast_p], [grad], [fast_m], [7.0], fused=True, **HYPER)
    # The kernel rounds exactly like the reference except torch's vectorized sqrt, which is not
    # correctly rounded (an ulp here and there).
    torch.testing.assert_close(fast_p, ref_p, rtol=1e-6, atol=1e-9)
    ulp = 1e-2 if state_dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(fast_m.exp_avg.float(), ref_m.exp_avg.float(), rtol=ulp, atol=1e-12)
    torch.testing.assert_close(fast_m.exp_avg_sq.float(), ref_m.exp_avg_sq.float(), rtol=ulp, atol=1e-12)
    assert (fast_m.exp_avg_sq.float() >= 0).all() and (ref_m.exp_avg_sq.float() >= 0).all()


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_kernels)])
def test_update_leaves_unselected_entries_bitwise_unchanged(fused):
    gen = torch.Generator().manual_seed(2)
    param, mask = random_state(10_000, 512, 0.1, gen)
    grad = torch.randn(10_000, generator=gen)
    before = param.clone()
    sparse_adamw([param], [grad], [mask], [3.0], fused=fused, **HYPER)
    selected = torch.zeros(10_000, dtype=torch.bool)
    selected[global_positions(mask.index, mask.layout)] = True
    assert torch.equal(param[~selected], before[~selected])
    assert (param[selected] != before[selected]).all()


def evolve(param, mask, gen, scale):
    """Moves the kept entries (as an update would) and returns the moved parameter."""
    moved = param.clone()
    at = global_positions(mask.index, mask.layout)
    moved[at] += torch.randn(at.numel(), generator=gen) * scale
    return moved


@needs_kernels
@pytest.mark.parametrize("selection", ["small_weights", "large_weights", "large_gradients"])
@pytest.mark.parametrize("scale", [1e-4, 1e-1])  # small moves (few candidates) and large ones
@pytest.mark.parametrize("new_density", [0.1, 0.05, 0.2])  # same k, fewer (filter), more (no filter)
def test_fused_refresh_matches_reference(selection, scale, new_density):
    gen = torch.Generator().manual_seed(3)
    numel, chunk_size = 50_001, 1024
    param, old = random_state(numel, chunk_size, 0.1, gen)
    param = evolve(param, old, gen, scale)
    grad = torch.randn(numel, generator=gen)
    layout = ChunkLayout.build(numel, chunk_size, new_density)
    kw = dict(selection=selection, state_dtype=torch.bfloat16, seeds=[0])
    ref = refresh_masks([param], [grad], [clone_mask(old)], [layout], fused=False, **kw)[0]
    fast = refresh_masks([param], [grad], [clone_mask(old)], [layout], fused=True, **kw)[0]
    assert torch.equal(fast.index, ref.index)
    assert torch.equal(fast.exp_avg, ref.exp_avg) and torch.equal(fast.exp_avg_sq, ref.exp_avg_sq)
    source = grad if selection == "large_gradients" else param
    expected = brute_force_bottomk(source, chunk_size, new_density, largest=selection != "small_weights")
    assert global_positions(ref.index, layout).tolist() == expected


@needs_kernels
@pytest.mark.parametrize("values", ["random", "tied"])
def test_fused_first_refresh_matches_brute_force(values):
    gen = torch.Generator().manual_seed(4)
    numel, chunk_size = 30_000, 4096
    param = torch.randn(numel, generator=gen) if values == "random" else tied_values(numel, gen)
    layout = ChunkLayout.build(numel, chunk_size, 0.1)
    mask = refresh_masks([param], [param], [None], [layout], selection="small_weights",
                         state_dtype=torch.bfloat16, seeds=[0], fused=True)[0]
    assert global_positions(mask.index, layout).tolist() == brute_force_bottomk(param, chunk_size, 0.1)
    assert (mask.exp_avg == 0).all() and (mask.exp_avg_sq == NEW_ENTRY).all()


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_kernels)])
def test_refresh_carries_moments_and_marks_new_entries(fused):
    gen = torch.Generator().manual_seed(5)
    param, old = random_state(20_000, 1000, 0.1, gen)
    param = evolve(param, old, gen, 0.5)
    layout = old.layout
    old_copy = clone_mask(old)
    new = refresh_masks([param], [param], [old], [layout], selection="small_weights",
                        state_dtype=torch.bfloat16, seeds=[0], fused=fused)[0]
    old_at = global_positions(old_copy.index, layout).tolist()
    new_at = global_positions(new.index, layout).tolist()
    where_old = {p: i for i, p in enumerate(old_at)}
    carried = fresh = 0
    for j, p in enumerate(new_at):
        if p in where_old:
            carried += 1
            assert new.exp_avg[j] == old_copy.exp_avg[where_old[p]]
            assert new.exp_avg_sq[j] == old_copy.exp_avg_sq[where_old[p]]
        else:
            fresh += 1
            assert new.exp_avg[j] == 0 and new.exp_avg_sq[j] == NEW_ENTRY
    assert carried > 0 and fresh > 0


def test_random_selection_depends_on_seed_only():
    gen = torch.Generator().manual_seed(6)
    param = torch.randn(5000, generator=gen)
    layout = ChunkLayout.build(5000, 1000, 0.1)

    def pick(seed):
        return refresh_masks([param], [param], [None], [layout], selection="random", state_dtype=torch.bfloat16,
                             seeds=[seed])[0].index

    assert torch.equal(pick(1), pick(1)) and not torch.equal(pick(1), pick(2))
