"""Fused Triton GPU kernels: the sparse AdamW update and the per-chunk bottom-k of a mask refresh.

These are the CUDA counterparts of the CPU kernels in ``csrc/cpu_kernels.cpp`` and follow the
same contract as the eager reference in ``functional.py``/``selection.py``;
``tests/test_triton.py`` checks them against it on the CPU under the Triton interpreter
(``TRITON_INTERPRET=1``). ``functional.sparse_adamw`` and ``functional.refresh_masks`` use them
automatically for CUDA tensors when :func:`triton_available` is true (and ``fused`` is not
``False``).

Update (:func:`sparse_adamw_triton`). One launch serves many tensors: a small int64 table holds,
per tensor, the addresses of its parameter, gradient, index and moments, its chunk layout and its
global offset; a second, per-step table holds its 16 cohort bias corrections and its rounding
salts. Each program takes ``_UPDATE_BLOCK`` consecutive kept entries of one tensor (found by a
binary search over the tensors' first blocks), splits each stored index into in-chunk position and
cohort, turns the position into the flat one ``chunk * chunk_size + position`` (``k`` kept per
full chunk, ``k_last`` in the partial last chunk), gathers gradient and parameter, and does the
AdamW step in float32 with its cohort's bias corrections. bf16 moments are stored with stochastic
rounding from the hash of ``nanoadam.rounding`` (the same integers as the reference), the
parameter in its own dtype (bf16: to nearest, or stochastically with a parameter salt); entries
outside the mask are never touched. Tensors are grouped into one launch per dtype combination.
The address table is cached on the device while addresses and layouts stay the same, so a step
copies only the small per-step table. Square root and division are the IEEE-rounded ones, as in
PyTorch.

Bottom-k (:func:`chunk_bottomk_triton`). One program per chunk, the whole chunk in registers:
the ``k``-th smallest 31-bit key ``T`` is found by bisection over the key bits (31 rounds, each
counting the keys below a candidate with one reduction), then every key below ``T`` is kept and,
of the keys equal to ``T``, the lowest positions fill the rest; an inclusive prefix sum gives each
kept entry its slot, so positions come out ascending. This is exactly ``selection.chunk_bottomk``.
A chunk must fit one program: chunks of at most ``MAX_TRITON_CHUNK`` (4096) entries run on the
GPU, longer ones fall back to the eager reference (still on the tensor's device).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from .masks import carry_moments
from .selection import ChunkLayout, chunk_bottomk, position_bits, random_keys, selection_keys

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

MAX_TRITON_CHUNK = 4096
_UPDATE_BLOCK = 1024  # kept entries per program of the update
_TABLE_COLUMNS = 11  # int64 per tensor: addresses, layout, global offset
_TERM_COLUMNS = 36  # int32 words per tensor and step: 16 step sizes, 16 bias corrections, 2 salts, padding
_UPDATE_WARPS = 4
_KEY_SOURCES = {"keys": 0, "small_weights": 1, "large_weights": 2, "large_gradients": 2}
_VALUE_DTYPES = (torch.float32, torch.bfloat16)
_STATE_DTYPES = (torch.float32, torch.bfloat16)
_INDEX_DTYPES = (torch.int16, torch.int32)
_INT32_MAX = 2**31 - 1


@functools.cache
def _cuda_available() -> bool:
    return torch.cuda.is_available()


def triton_available() -> bool:
    """True when Triton imports and CUDA is available: then NanoAdam uses these kernels for CUDA
    tensors."""
    return triton is not None and _cuda_available()


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton kernels need the 'triton' package (pip install 'nanoadam[gpu]')")


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _round_bf16(x):
        # Round float32 to the nearest bfloat16 value, ties to even, NaN kept: the result is exactly
        # representable, so any float -> bfloat16 conversion after it is exact.
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, r.to(tl.float32, bitcast=True))

    @triton.jit
    def _hash32(pos, salt):
        # nanoadam.rounding.hash32: murmur3's finalizer of (position ^ salt), in uint32 arithmetic.
        lo = (pos & 0xFFFFFFFF).to(tl.uint32)
        hi = (pos >> 32).to(tl.uint32)
        h = lo ^ (hi * 0x9E3779B9) ^ salt
        h = h ^ (h >> 16)
        h = h * 0x85EBCA6B
        h = h ^ (h >> 13)
        h = h * 0xC2B2AE35
        return h ^ (h >> 16)

    @triton.jit
    def _round_bf16_stochastic(x, noise):
        # Add 16 random bits and truncate (unbiased); inf and NaN pass through.
        u = x.to(tl.uint32, bitcast=True)
        r = ((u + noise) & 0xFFFF0000).to(tl.float32, bitcast=True)
        finite = (u & 0x7FFFFFFF) < 0x7F800000
        return tl.where(finite, r, x)

    @triton.jit
    def _sparse_adamw_kernel(
        table, first_block, step_terms, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
        PARAM_T: tl.constexpr, GRAD_T: tl.constexpr, INDEX_T: tl.constexpr, STATE_T: tl.constexpr,
        PARAM_BF16: tl.constexpr, STATE_BF16: tl.constexpr, PARAM_STOCHASTIC: tl.constexpr,
        POS_BITS: tl.constexpr, LOG_TASKS: tl.constexpr, BLOCK: tl.constexpr, TABLE_COLUMNS: tl.constexpr,
        TERM_COLUMNS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        # The task of this block: the last one whose first block is <= pid (padding rows hold INT32_MAX).
        t = pid * 0
        for s in tl.static_range(LOG_TASKS):
            cand = t + (1 << (LOG_TASKS - 1 - s))
            t = tl.where(tl.load(first_block + cand) <= pid, cand, t)
        row = table + t.to(tl.int64) * TABLE_COLUMNS
        param = tl.load(row + 0).to(tl.pointer_type(PARAM_T))
        grad = tl.load(row + 1).to(tl.pointer_type(GRAD_T))
        index = tl.load(row + 2).to(tl.pointer_type(INDEX_T))
        exp_avg = tl.load(row + 3).to(tl.pointer_type(STATE_T))
        exp_avg_sq = tl.load(row + 4).to(tl.pointer_type(STATE_T))
        chunk_size = tl.load(row + 5)
        k = tl.load(row + 6).to(tl.int32)
        full_kept = tl.load(row + 7).to(tl.int32)
        tail_start = tl.load(row + 8)
        kept = tl.load(row + 9).to(tl.int32)
        offset = tl.load(row + 10)
        terms = step_terms + t.to(tl.int64) * TERM_COLUMNS  # int32 words
        salt_m = tl.load(terms + 32).to(tl.uint32, bitcast=True)
        salt_p = tl.load(terms + 33).to(tl.uint32, bitcast=True)

        j = (pid - tl.load(first_block + t)) * BLOCK + tl.arange(0, BLOCK)  # kept entry within the tensor
        valid = j < kept
        raw = tl.load(index + j, mask=valid, other=0).to(tl.int32) & ((1 << (POS_BITS + 4)) - 1)
        cohort = (raw >> POS_BITS) & 15
        chunk_start = tl.where(j < full_kept, (j // k).to(tl.int64) * chunk_size, tail_start)
        at = chunk_start + (raw & ((1 << POS_BITS) - 1)).to(tl.int64)
        step_size = tl.load(terms + cohort, mask=valid, other=0).to(tl.float32, bitcast=True)
        bc2_sqrt = tl.load(terms + 16 + cohort, mask=valid, other=0x3F800000).to(tl.float32, bitcast=True)

        g = tl.load(grad + at, mask=valid, other=0.0).to(tl.float32)
        w = tl.load(param + at, mask=valid, other=0.0).to(tl.float32)
        m = tl.load(exp_avg + j, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(exp_avg_sq + j, mask=valid, other=0.0).to(tl.float32)
        # The operation order of torch.optim.AdamW's single-tensor path (and of the CPU kernel).
        w = w * decay
        if one_minus_beta1 < 0.5:  # torch.lerp's two formulas, fused multiply-adds as there
            m = tl.fma(one_minus_beta1, g - m, m)
        else:
            m = tl.fma(one_minus_beta1 - 1.0, g - m, g)
        v = tl.fma(one_minus_beta2 * g, g, v * beta2)  # addcmul
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        w = w + tl.div_rn(-step_size * m, denom)

        pos = offset + at
        if PARAM_BF16:
            if PARAM_STOCHASTIC:
                w = _round_bf16_stochastic(w, _hash32(pos, salt_p) & 0xFFFF)
            else:
                w = _round_bf16(w)
        if STATE_BF16:
            h = _hash32(pos, salt_m)
            m = _round_bf16_stochastic(m, h & 0xFFFF)
            v = _round_bf16_stochastic(v, h >> 16)
        tl.store(param + at, w.to(PARAM_T), mask=valid)
        tl.store(exp_avg + j, m.to(STATE_T), mask=valid)
        tl.store(exp_avg_sq + j, v.to(STATE_T), mask=valid)

    @triton.jit
    def _chunk_bottomk_kernel(src, out, numel, chunk_size, k, k_last, full_chunks,
                              SOURCE: tl.constexpr, BLOCK: tl.constexpr):
        c = tl.program_id(0)
        full = c < full_chunks
        start = c.to(tl.int64) * chunk_size
        length = tl.where(full, chunk_size, numel - start)
        kc = tl.where(full, k, k_last).to(tl.int32)
        pos = tl.arange(0, BLOCK)
        valid = pos < length
        x = tl.load(src + start + pos, mask=valid, other=0)
        if SOURCE == 0:  # integer keys in [0, 2^31 - 1]
            key = x.to(tl.int32)
        else:  # the IEEE bits of |x|: monotone in |x|, NaN above inf; reversed for the large_* selections
            key = x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
            if SOURCE == 2:
                key = 0x7FFFFFFF - key
        # T: the largest value with fewer than kc keys below it, i.e. the kc-th smallest key.
        threshold = kc * 0
        for b in tl.static_range(31):
            cand = threshold | (1 << (30 - b))
            below = tl.sum(((key < cand) & valid).to(tl.int32), axis=0)
            threshold = tl.where(below < kc, cand, threshold)
        less = (key < threshold) & valid
        ties = (key == threshold) & valid
        room = kc - tl.sum(less.to(tl.int32), axis=0)
        chosen = less | (ties & (tl.cumsum(ties.to(tl.int32), axis=0) <= room))
        slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        tl.store(out + c.to(tl.int64) * k + slot, pos.to(out.dtype.element_ty), mask=chosen)


# ------------------------------------------------------------------------------------------------
# Update
# ------------------------------------------------------------------------------------------------


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.int16: tl.int16,
            torch.int32: tl.int32}[dtype]


def tensor_applies(param: torch.Tensor, grad: torch.Tensor, state_dtype: torch.dtype) -> bool:
    """Whether these kernels can update and refresh this parameter (before any state exists)."""
    plain = (torch.Tensor, torch.nn.Parameter)
    return (
        type(param) in plain and type(grad) in plain
        and param.is_contiguous() and grad.is_contiguous() and grad.device == param.device
        and param.dtype in _VALUE_DTYPES and grad.dtype in _VALUE_DTYPES and state_dtype in _STATE_DTYPES
    )


def update_applies(param: torch.Tensor, grad: torch.Tensor, mask) -> bool:
    """Whether :func:`sparse_adamw_triton` can serve this tensor (any device the kernel runs on)."""
    plain = (torch.Tensor, torch.nn.Parameter)
    tensors = (param, grad, mask.index, mask.exp_avg, mask.exp_avg_sq)
    return (
        all(type(t) in plain and t.is_contiguous() and t.device == param.device for t in tensors)
        and param.dtype in _VALUE_DTYPES
        and grad.dtype in _VALUE_DTYPES
        and mask.exp_avg.dtype in _STATE_DTYPES
        and mask.exp_avg_sq.dtype == mask.exp_avg.dtype
        and mask.index.dtype in _INDEX_DTYPES
        and mask.layout.kept <= _INT32_MAX
        and param.numel() == mask.layout.numel
    )


_TABLES: dict = {}  # (device, rows) -> (table, first_block): the last few, reused while unchanged


def _task_table(rows: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    blocks = [-(-row[9] // _UPDATE_BLOCK) for row in rows]
    log_tasks = max(1, math.ceil(math.log2(len(rows))))
    key = (device, rows, _UPDATE_BLOCK)
    hit = _TABLES.get(key)
    if hit is None:
        firsts, total = [], 0
        for b in blocks:
            firsts.append(total)
            total += b
        firsts += [_INT32_MAX] * ((1 << log_tasks) - len(rows))
        host = torch.tensor([v for row in rows for v in row] + firsts, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
        data = host.to(device, non_blocking=True)
        if len(_TABLES) >= 16:
            _TABLES.pop(next(iter(_TABLES)))
        n = _TABLE_COLUMNS * len(rows)
        hit = _TABLES[key] = (data[:n], data[n:].to(torch.int32), sum(blocks))
    return hit[0], hit[1], hit[2], log_tasks


def _step_terms(terms, device: torch.device) -> torch.Tensor:
    """The per-step table: per tensor, 16 step sizes and 16 bias corrections (float32 bits), then the
    moment and parameter salts, as int32 words on ``device``."""
    floats = torch.tensor([t.bias for t in terms], dtype=torch.float32).view(torch.int32)
    salts = torch.tensor([[t.moment_salt, t.param_salt or 0, 0, 0] for t in terms], dtype=torch.int64)
    salts = torch.where(salts >= 1 << 31, salts - (1 << 32), salts).to(torch.int32)
    host = torch.cat([floats, salts], dim=1).contiguous()
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def sparse_adamw_triton(params, grads, masks, terms, *, lr, beta1, beta2, eps, weight_decay) -> None:
    """The sparse AdamW update of ``functional._reference_sparse_adamw`` (same arguments, same result up
    to float rounding, the same random bits) on the GPU: one kernel launch per group of tensors
    with the same dtypes. Every tensor must satisfy :func:`update_applies`."""
    _require_triton()
    groups: dict = {}
    for p, g, mask, term in zip(params, grads, masks, terms):
        if not update_applies(p, g, mask):
            raise ValueError("sparse_adamw_triton needs contiguous float32/bfloat16 params and grads, "
                             "float32/bfloat16 moments and int16/int32 indices on one device")
        if mask.layout.kept == 0:
            continue
        stochastic = p.dtype == torch.bfloat16 and term.param_salt is not None
        sig = (p.device, p.dtype, g.dtype, mask.index.dtype, mask.exp_avg.dtype, stochastic)
        groups.setdefault(sig, []).append((p, g, mask, term))
    for (device, p_dtype, g_dtype, i_dtype, s_dtype, stochastic), tasks in groups.items():
        rows = []
        for p, g, mask, term in tasks:
            lay: ChunkLayout = mask.layout
            full = lay.numel // lay.chunk_size
            rows.append((p.data_ptr(), g.data_ptr(), mask.index.data_ptr(), mask.exp_avg.data_ptr(),
                         mask.exp_avg_sq.data_ptr(), lay.chunk_size, lay.k, full * lay.k, full * lay.chunk_size,
                         lay.kept, term.offset))
        table, first_block, n_blocks, log_tasks = _task_table(tuple(rows), device)
        step_terms = _step_terms([term for *_, term in tasks], device)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            _sparse_adamw_kernel[(n_blocks,)](
                table, first_block, step_terms, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps,
                PARAM_T=_tl_dtype(p_dtype), GRAD_T=_tl_dtype(g_dtype), INDEX_T=_tl_dtype(i_dtype),
                STATE_T=_tl_dtype(s_dtype), PARAM_BF16=p_dtype == torch.bfloat16,
                STATE_BF16=s_dtype == torch.bfloat16, PARAM_STOCHASTIC=stochastic,
                POS_BITS=position_bits(tasks[0][2].layout.chunk_size), LOG_TASKS=log_tasks, BLOCK=_UPDATE_BLOCK,
                TABLE_COLUMNS=_TABLE_COLUMNS, TERM_COLUMNS=_TERM_COLUMNS,
                num_warps=_UPDATE_WARPS, enable_fp_fusion=False,  # explicit fma only: the reference rounding
            )


# ------------------------------------------------------------------------------------------------
# Mask refresh
# ------------------------------------------------------------------------------------------------


def chunk_bottomk_triton(keys_or_values: torch.Tensor, layout: ChunkLayout, selection: str | None = None):
    """``selection.chunk_bottomk(selection_keys(values, selection), layout)``, exactly, in one
    Triton launch (one program per chunk).

    ``keys_or_values`` is either an integer tensor of keys in ``[0, 2^31 - 1]`` (as
    ``selection_keys`` and ``random_keys`` make them; ``selection`` is then ignored) or the values
    themselves (float32/bfloat16/float16, any shape), whose keys the kernel computes for
    ``selection`` in ``small_weights``, ``large_weights``, ``large_gradients``. Chunks longer
    than ``MAX_TRITON_CHUNK`` use the eager reference."""
    _require_triton()
    x = keys_or_values.detach().reshape(-1)
    is_keys = not x.is_floating_point()
    if not is_keys and selection not in ("small_weights", "large_weights", "large_gradients"):
        raise ValueError(f"chunk_bottomk_triton computes keys for the magnitude selections only, not {selection!r}; "
                         "pass integer keys instead")
    if x.numel() != layout.numel:
        raise ValueError(f"{x.numel()} entries for a layout of {layout.numel}")
    if layout.chunk_size > MAX_TRITON_CHUNK or (not is_keys and x.dtype not in (*_VALUE_DTYPES, torch.float16)):
        return chunk_bottomk(x if is_keys else selection_keys(x, selection), layout)
    x = x.contiguous()
    out = torch.empty(layout.kept, dtype=layout.index_dtype, device=x.device)
    n_chunks = layout.full_chunks + (1 if layout.tail else 0)
    if n_chunks == 0:
        return out
    block = triton.next_power_of_2(layout.chunk_size)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _chunk_bottomk_kernel[(n_chunks,)](
            x, out, layout.numel, layout.chunk_size, layout.k, layout.k_last, layout.full_chunks,
            SOURCE=0 if is_keys else _KEY_SOURCES[selection], BLOCK=block,
            num_warps=max(1, min(8, block // 256)),
        )
    return out


def refresh_triton(params, grads, old_masks, layouts, terms, *, selection, state_dtype):
    """``functional._reference_refresh`` for each tensor with the bottom-k done by
    :func:`chunk_bottomk_triton`; cohorts and moments carried over with torch ops, as there."""
    _require_triton()
    out = []
    for param, grad, old, layout, term in zip(params, grads, old_masks, layouts, terms):
        if selection == "random":
            pos = chunk_bottomk_triton(random_keys(layout.numel, term.random_salt, term.offset, param.device), layout)
        else:
            pos = chunk_bottomk_triton(grad if selection == "large_gradients" else param, layout, selection)
        out.append(carry_moments(pos, layout, old, state_dtype, term))
    return out
