"""Counter-based randomness and stochastic rounding to bfloat16.

Every random number NanoAdam uses (the rounding of bf16 moments and weights, the keys of
``selection="random"``) is a hash of a 32-bit *salt* and an entry's global position: the salt
mixes the parameter's ordinal in the optimizer, the optimizer step and a stream tag, the position
is the entry's flat index in the whole (unsharded) tensor. No generator state exists, so a resumed
run draws exactly what an uninterrupted one draws, every DDP rank draws the same, and the shards of
an FSDP2 parameter draw what the unsharded parameter would.

The hash is murmur3's 32-bit finalizer (a bijection with full avalanche) of ``position ^ salt``;
the C++ kernel (``csrc/cpu_kernels.cpp``) and the Triton kernel compute the same integers, so
all paths round identically.

Stochastic rounding of a float32 ``x`` to bfloat16 adds a 16-bit random integer to its bits and
truncates: ``x`` rounds away from zero with probability equal to the fraction cut off, so the
stored value equals ``x`` in expectation. Round to nearest instead drops every change smaller
than half a bf16 step, which is how a bf16 ``exp_avg_sq`` at ``beta2 = 0.999`` (0.1 % change a
step) would never decay.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF

# Stream tags: independent random numbers for each use at the same step and position.
STREAM_MOMENTS = 1  # update: low 16 bits round exp_avg, high 16 bits round exp_avg_sq
STREAM_PARAM = 2  # update: rounding of bf16 weights (stochastic_rounding=True)
STREAM_MERGE = 3  # refresh: rounding of moments rescaled when two cohorts merge
STREAM_RANDOM = 4  # refresh: keys of selection="random"


def fmix32_int(h: int) -> int:
    """murmur3's finalizer on a Python int (host side: salts)."""
    h &= _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h


def salt(ordinal: int, step: int, stream: int) -> int:
    """The 32-bit salt of parameter ``ordinal`` at optimizer step ``step`` for ``stream``."""
    h = fmix32_int(ordinal * 0x9E3779B9 + 0x5EED)
    h = fmix32_int(h ^ (step & _M32) ^ fmix32_int(step >> 32))
    return fmix32_int(h ^ (stream * 0x632BE5AB))


def _int32(c: int) -> int:
    """A 32-bit pattern as the int32 that holds it."""
    c &= _M32
    return c - (1 << 32) if c >= 1 << 31 else c


def hash32(positions: torch.Tensor, salt_value: int) -> torch.Tensor:
    """32-bit hashes (int64 in [0, 2^32)) of int64 global ``positions`` under ``salt_value``.

    Computed in int32 lanes, where torch's multiplication wraps around like the kernels' uint32
    arithmetic (3x faster than int64 lanes); right shifts are masked to act as logical shifts.
    ``tests/test_mixed_precision.py`` holds it to the plain-Python definition."""
    pos = positions.long()
    low = pos & _M32
    x = (low - ((low >> 31) << 32)).to(torch.int32)
    high = pos >> 32
    if bool((high != 0).any()):
        x = x ^ (high.to(torch.int32) * _int32(0x9E3779B9))
    h = x ^ _int32(salt_value)
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _int32(0x85EBCA6B)
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _int32(0xC2B2AE35)
    h = h ^ ((h >> 16) & 0xFFFF)
    return h.long() & _M32


def hash32_int(position: int, salt_value: int) -> int:
    """The definition of :func:`hash32`, one position at a time in plain Python."""
    x = (position & _M32) ^ (((position >> 32) * 0x9E3779B9) & _M32) ^ (salt_value & _M32)
    return fmix32_int(x)


def stochastic_round_bf16(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16, rounding away from zero with probability equal to the fraction cut off.

    ``noise``: integers in [0, 2^16), one per entry (e.g. ``hash32(...) & 0xFFFF``). Unbiased;
    inf and NaN pass through."""
    x = x.float().contiguous()
    bits = x.view(torch.int32)
    rounded = ((bits + noise.to(torch.int32)) & ~0xFFFF).view(torch.float32)
    if not bool(torch.isfinite(x).all()):  # only then: noise could carry a NaN's payload into its sign
        rounded = torch.where(torch.isfinite(x), rounded, x)
    return rounded.to(torch.bfloat16)


def round_to(x: torch.Tensor, dtype: torch.dtype, noise: torch.Tensor | None) -> torch.Tensor:
    """``x`` (float32) stored as ``dtype``: stochastically for bfloat16 with ``noise``, else to nearest."""
    if dtype == torch.bfloat16 and noise is not None:
        return stochastic_round_bf16(x, noise)
    return x.to(dtype)
