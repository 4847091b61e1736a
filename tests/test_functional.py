"""The math on flat tensors: masks against brute force, fused kernels against the reference."""

import math

import pytest
import torch

from nanoadam import _cpu
from nanoadam.cohorts import Merge
from nanoadam.functional import (
    CPU_KERNEL,
    REFERENCE,
    Mask,
    RefreshTerms,
    UpdateTerms,
    refresh_masks,
    sparse_adamw,
)
from nanoadam.rounding import hash32
from nanoadam.selection import (
    ChunkLayout,
    chunk_bottomk,
    cohort_ids,
    global_positions,
    kept_per_chunk,
    pack_index,
    positions,
    random_keys,
    selection_keys,
)

needs_kernels = pytest.mark.skipif(not _cpu.available(), reason="compiled CPU kernels not installed")
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
IMPLS = [REFERENCE, pytest.param(CPU_KERNEL, marks=needs_kernels)]


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


def test_layout_index_dtype_counts_and_packing():
    small = ChunkLayout.build(10_000, 4096, 0.1)
    assert small.index_dtype == torch.int16 and small.kept == 2 * 410 + 181 and small.position_bits == 12
    big = ChunkLayout.build(100_000, 40_000, 0.1)
    assert big.index_dtype == torch.int32 and big.kept == 2 * 4000 + 2000 and big.position_bits == 27
    assert ChunkLayout.build(10_000, 4097, 0.1).index_dtype == torch.int32
    for layout, top in ((small, 4095), (big, 39_999)):
        pos = torch.tensor([0, 1, top, 7, top])
        cohort = torch.tensor([0, 15, 15, 8, 7])
        packed = pack_index(pos, cohort, layout)
        assert packed.dtype == layout.index_dtype
        assert positions(packed, layout).tolist() == pos.tolist()
        assert cohort_ids(packed, layout).tolist() == cohort.tolist()


# -- states and terms ---------------------------------------------------------------------------------


def random_state(numel, chunk_size, density, gen, state_dtype=torch.bfloat16, cohorts=4):
    """A mask of the smallest weights whose entries sit in ``cohorts`` cohorts at random."""
    layout = ChunkLayout.build(numel, chunk_size, density)
    param = torch.randn(numel, generator=gen)
    pos = chunk_bottomk(selection_keys(param, "small_weights"), layout)
    cohort = torch.randint(0, cohorts, (layout.kept,), generator=gen)
    m = (torch.randn(layout.kept, generator=gen) * 1e-3).to(state_dtype)
    v = (torch.rand(layout.kept, generator=gen) * 1e-6).to(state_dtype)
    return param, Mask(pack_index(pos, cohort, layout), m, v, layout)


def update_terms(step=7, born=(1, 3, 5, 7), offset=0, seed=3, lr=HYPER["lr"]):
    born = list(born) + [0] * (16 - len(born))
    ages = [step - b + 1 if b else 1 for b in born]
    bias = tuple([lr / (1 - 0.9**a) for a in ages] + [math.sqrt(1 - 0.999**a) for a in ages])
    return UpdateTerms(bias, seed, step, False, offset)


def refresh_terms(newborn=5, merge=None, offset=0):
    return RefreshTerms(newborn, merge, 0x1234567, 0x7654321, offset)


def clone_mask(mask):
    return Mask(mask.index.clone(), mask.exp_avg.clone(), mask.exp_avg_sq.clone(), mask.layout)


@needs_kernels
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk_size", [256, 40_000])
def test_fused_update_matches_reference(state_dtype, chunk_size):
    gen = torch.Generator().manual_seed(1)
    numel = 100_003
    param, mask = random_state(numel, chunk_size, 0.1, gen, state_dtype)
    grad = torch.randn(numel, generator=gen)
    ref_p, fast_p = param.clone(), param.clone()
    ref_m, fast_m = clone_mask(mask), clone_mask(mask)
    terms = [update_terms(offset=123)]
    sparse_adamw([ref_p], [grad], [ref_m], terms, [REFERENCE], **HYPER)
    sparse_adamw([fast_p], [grad], [fast_m], terms, [CPU_KERNEL], **HYPER)
    # The kernel rounds like the reference except torch's vectorized sqrt, which is not always
    # correctly rounded (an ulp here and there); the rounding noise is the same integers.
    torch.testing.assert_close(fast_p, ref_p, rtol=1e-6, atol=1e-6 * HYPER["lr"])  # an ulp of a step of ~lr
    ulp = 2**-7 if state_dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(fast_m.exp_avg.float(), ref_m.exp_avg.float(), rtol=ulp, atol=1e-12)
    torch.testing.assert_close(fast_m.exp_avg_sq.float(), ref_m.exp_avg_sq.float(), rtol=ulp, atol=1e-12)
    assert torch.equal(fast_m.index, mask.index)
    if state_dtype == torch.bfloat16:  # the same random bits: nearly every entry rounds the same way
        assert (fast_m.exp_avg_sq == ref_m.exp_avg_sq).float().mean() > 0.999


@pytest.mark.parametrize("impl", IMPLS)
def test_update_uses_each_entrys_cohort(impl):
    """An entry of a cohort born at the current step takes Adam's first step, whatever its stored
    moments' scale elsewhere: lr * g / (|g| + eps) from zero moments."""
    gen = torch.Generator().manual_seed(9)
    param, mask = random_state(5000, 500, 0.1, gen, torch.float32, cohorts=2)
    young = cohort_ids(mask.index, mask.layout) == 1
    mask.exp_avg[young] = 0
    mask.exp_avg_sq[young] = 0
    grad = torch.randn(5000, generator=gen)
    before = param.clone()
    hyper = dict(HYPER, weight_decay=0.0)
    sparse_adamw([param], [grad], [mask], [update_terms(step=50, born=(1, 50))], [impl], **hyper)
    at = global_positions(mask.index, mask.layout)[young]
    g = grad[at]
    torch.testing.assert_close(param[at] - before[at], -hyper["lr"] * g / (g.abs() + 1e-8), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
def test_update_leaves_unselected_entries_bitwise_unchanged(impl):
    gen = torch.Generator().manual_seed(2)
    param, mask = random_state(10_000, 512, 0.1, gen)
    grad = torch.randn(10_000, generator=gen)
    before = param.clone()
    sparse_adamw([param], [grad], [mask], [update_terms()], [impl], **HYPER)
    selected = torch.zeros(10_000, dtype=torch.bool)
    selected[global_positions(mask.index, mask.layout)] = True
    assert torch.equal(param[~selected], before[~selected])
    assert (param[selected] != before[selected]).all()


def test_bf16_moment_rounding_is_a_function_of_salt_and_global_position():
    """A shard at offset o rounds its entries exactly as the whole tensor rounds them there."""
    gen = torch.Generator().manual_seed(11)
    param, mask = random_state(4096, 512, 0.1, gen)
    grad = torch.randn(4096, generator=gen)
    whole_p, whole_m = param.clone(), clone_mask(mask)
    sparse_adamw([whole_p], [grad], [whole_m], [update_terms()], [REFERENCE], **HYPER)
    half = ChunkLayout.build(2048, 512, 0.1)
    shards = []
    for s in range(2):
        p = param[2048 * s:2048 * (s + 1)].clone()
        rows = slice(half.kept * s, half.kept * (s + 1))
        m = Mask(mask.index[rows].clone(), mask.exp_avg[rows].clone(), mask.exp_avg_sq[rows].clone(), half)
        sparse_adamw([p], [grad[2048 * s:2048 * (s + 1)]], [m], [update_terms(offset=2048 * s)], [REFERENCE], **HYPER)
        shards.append((p, m))
    assert torch.equal(torch.cat([p for p, _ in shards]), whole_p)
    assert torch.equal(torch.cat([m.exp_avg_sq for _, m in shards]), whole_m.exp_avg_sq)
    assert torch.equal(torch.cat([m.exp_avg for _, m in shards]), whole_m.exp_avg)


# -- refresh ------------------------------------------------------------------------------------------


def evolve(param, mask, gen, scale):
    """Moves the kept entries (as an update would) and returns the moved parameter."""
    moved = param.clone()
    at = global_positions(mask.index, mask.layout)
    moved[at] += torch.randn(at.numel(), generator=gen) * scale
    return moved


MERGE = Merge(young=2, old=1, m_factor=1.25, v_factor=1.5)


@needs_kernels
@pytest.mark.parametrize("selection", ["small_weights", "large_weights", "large_gradients"])
@pytest.mark.parametrize("scale", [1e-4, 1e-1])  # small moves (few candidates) and large ones
@pytest.mark.parametrize("new_density", [0.1, 0.05, 0.2])  # same k, fewer (filter), more (no filter)
@pytest.mark.parametrize("merge", [None, MERGE])
def test_fused_refresh_matches_reference(selection, scale, new_density, merge):
    gen = torch.Generator().manual_seed(3)
    numel, chunk_size = 50_001, 1024
    param, old = random_state(numel, chunk_size, 0.1, gen)
    param = evolve(param, old, gen, scale)
    grad = torch.randn(numel, generator=gen)
    layout = ChunkLayout.build(numel, chunk_size, new_density)
    kw = dict(selection=selection, state_dtype=torch.bfloat16)
    terms = [refresh_terms(merge=merge, offset=77)]
    ref = refresh_masks([param], [grad], [clone_mask(old)], [layout], terms, [REFERENCE], **kw)[0]
    fast = refresh_masks([param], [grad], [clone_mask(old)], [layout], terms, [CPU_KERNEL], **kw)[0]
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
    mask = refresh_masks([param], [param], [None], [layout], [refresh_terms(newborn=0)], [CPU_KERNEL],
                         selection="small_weights", state_dtype=torch.bfloat16)[0]
    assert global_positions(mask.index, layout).tolist() == brute_force_bottomk(param, chunk_size, 0.1)
    assert (mask.exp_avg == 0).all() and (mask.exp_avg_sq == 0).all()
    assert (cohort_ids(mask.index, layout) == 0).all()


@needs_kernels
def test_huge_chunk_size_on_a_small_tensor_needs_no_huge_scratch():
    """Scratch is sized by the chunk's real length: chunk_size 2**27 on 1000 entries is one chunk."""
    gen = torch.Generator().manual_seed(8)
    param = torch.randn(1000, generator=gen)
    layout = ChunkLayout.build(1000, 2**27, 0.1)
    args = ([param], [param], [None], [layout], [refresh_terms(newborn=0)])
    kw = dict(selection="small_weights", state_dtype=torch.bfloat16)
    fast = refresh_masks(*args, [CPU_KERNEL], **kw)[0]
    assert torch.equal(fast.index, refresh_masks(*args, [REFERENCE], **kw)[0].index)
    assert global_positions(fast.index, layout).tolist() == brute_force_bottomk(param, 2**27, 0.1)


@pytest.mark.parametrize("impl", IMPLS)
def test_refresh_carries_moments_and_cohorts_and_applies_the_merge(impl):
    gen = torch.Generator().manual_seed(5)
    param, old = random_state(20_000, 1000, 0.1, gen, cohorts=4)
    param = evolve(param, old, gen, 0.5)
    layout = old.layout
    old_copy = clone_mask(old)
    new = refresh_masks([param], [param], [old], [layout], [refresh_terms(newborn=MERGE.young, merge=MERGE)],
                        [impl], selection="small_weights", state_dtype=torch.bfloat16)[0]
    old_at = global_positions(old_copy.index, layout).tolist()
    old_cohort = cohort_ids(old_copy.index, layout).tolist()
    new_at = global_positions(new.index, layout).tolist()
    new_cohort = cohort_ids(new.index, layout).tolist()
    where_old = {p: i for i, p in enumerate(old_at)}
    counts = {"carried": 0, "merged": 0, "new": 0}
    for j, p in enumerate(new_at):
        if p not in where_old:
            counts["new"] += 1
            assert new.exp_avg[j] == 0 and new.exp_avg_sq[j] == 0 and new_cohort[j] == MERGE.young
            continue
        i = where_old[p]
        if old_cohort[i] == MERGE.young:
            counts["merged"] += 1
            assert new_cohort[j] == MERGE.old
            for got, was, factor in ((new.exp_avg[j], old_copy.exp_avg[i], MERGE.m_factor),
                                     (new.exp_avg_sq[j], old_copy.exp_avg_sq[i], MERGE.v_factor)):
                exact = was.float() * factor  # stochastically rounded: one of the two neighbours
                assert abs(got.float() - exact) <= abs(exact) * 2**-7
        else:
            counts["carried"] += 1
            assert new_cohort[j] == old_cohort[i]
            assert new.exp_avg[j] == old_copy.exp_avg[i] and new.exp_avg_sq[j] == old_copy.exp_avg_sq[i]
    assert min(counts.values()) > 0, counts


@needs_kernels
def test_in_place_refresh_of_an_unchanged_mask_still_merges():
    gen = torch.Generator().manual_seed(12)
    param, old = random_state(8192, 1024, 0.1, gen, cohorts=4)
    terms = [refresh_terms(newborn=MERGE.young, merge=MERGE)]
    kw = dict(selection="small_weights", state_dtype=torch.bfloat16)
    ref = refresh_masks([param], [param], [clone_mask(old)], [old.layout], terms, [REFERENCE], **kw)[0]
    fast = refresh_masks([param], [param], [old], [old.layout], terms, [CPU_KERNEL], **kw)[0]
    assert fast.index.data_ptr() == old.index.data_ptr()  # same layout: refreshed in place
    assert torch.equal(fast.index, ref.index) and torch.equal(fast.exp_avg_sq, ref.exp_avg_sq)
    assert not (cohort_ids(fast.index, old.layout) == MERGE.young).any()


@needs_kernels
def test_the_kernel_computes_the_same_salts():
    from nanoadam.rounding import salt

    for ordinal, step, stream in ((0, 1, 1), (7, 123456, 1), (2**31 + 5, 2**40 + 3, 4), (101, 10**12, 3)):
        assert _cpu.salt(ordinal, step, stream) == salt(ordinal, step, stream)


def test_random_keys_depend_on_salt_and_global_position_only():
    whole = random_keys(5000, salt_value := 99, 0, torch.device("cpu"))
    assert torch.equal(random_keys(2000, salt_value, 3000, torch.device("cpu")), whole[3000:])
    assert not torch.equal(random_keys(5000, 100, 0, torch.device("cpu")), whole)
    assert int(whole.min()) >= 0 and int(whole.max()) < 2**31
    assert torch.equal(whole, hash32(torch.arange(5000), 99) >> 1)
