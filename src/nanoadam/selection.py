"""Chunked per-tensor masks: the layout of the kept entries and the reference selection.

A sparse tensor is flattened and cut into consecutive chunks of ``chunk_size`` entries (the last
one may be shorter). A chunk of length ``L`` keeps ``k = ceil(density * L)`` entries, chosen by
the smallest *key*; ties go to the lower position, so the choice is a deterministic function of
the values. Kept positions are stored per chunk, ascending, as int16 when chunks have at most
32768 entries and int32 otherwise, which also makes the kept entries globally ascending.

Everything here is loop-free eager PyTorch and runs on any device; it is the reference for the
fused CPU kernel in ``csrc/cpu_kernels.cpp``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import torch

SELECTIONS = ("small_weights", "large_weights", "random", "large_gradients")
INT16_CHUNK_LIMIT = 32768
_KEY_MAX = 0x7FFFFFFF


def kept_per_chunk(density: float, length: int) -> int:
    """``ceil(density * length)``, at least 1, computed exactly on the decimal that ``density``
    prints as: ``0.3 * 10`` is 3 and ``0.1 * 40000`` is 4000 (float products give 4 and 4001)."""
    return max(1, min(length, math.ceil(Fraction(repr(float(density))) * length)))


@dataclass(frozen=True)
class ChunkLayout:
    """Where the kept entries of one flat tensor live: ``k`` per full chunk, ``k_last`` in the
    trailing partial chunk (0 when there is none)."""

    numel: int
    chunk_size: int
    k: int
    k_last: int

    @classmethod
    @functools.lru_cache(maxsize=4096)  # a pure function of three numbers, asked every step
    def build(cls, numel: int, chunk_size: int, density: float) -> ChunkLayout:
        tail = numel % chunk_size
        k_last = kept_per_chunk(density, tail) if tail else 0
        return cls(numel, chunk_size, kept_per_chunk(density, chunk_size), k_last)

    @property
    def full_chunks(self) -> int:
        return self.numel // self.chunk_size

    @property
    def tail(self) -> int:
        return self.numel % self.chunk_size

    @property
    def kept(self) -> int:
        return self.full_chunks * self.k + self.k_last

    @property
    def index_dtype(self) -> torch.dtype:
        return torch.int16 if self.chunk_size <= INT16_CHUNK_LIMIT else torch.int32


def selection_keys(values: torch.Tensor, selection: str) -> torch.Tensor:
    """Int64 keys of a flat tensor, smaller = selected first: the IEEE bits of ``|x|`` (monotone in
    ``|x|``, NaN above +inf), reversed for the ``large_*`` selections."""
    bits = values.detach().float().reshape(-1).view(torch.int32).long() & _KEY_MAX
    return bits if selection == "small_weights" else _KEY_MAX - bits


def random_keys(numel: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, _KEY_MAX, (numel,), generator=generator, dtype=torch.int64).to(device)


def _bottomk_rows(keys: torch.Tensor, k: int) -> torch.Tensor:
    # A stable sort puts equal keys in position order: the lower position wins a tie.
    order = torch.sort(keys, dim=1, stable=True).indices[:, :k]
    return torch.sort(order, dim=1).values


def chunk_bottomk(keys: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """In-chunk positions of the ``k`` smallest keys of every chunk, ascending, chunk-major."""
    full = layout.full_chunks * layout.chunk_size
    parts = []
    if layout.full_chunks:
        parts.append(_bottomk_rows(keys[:full].view(layout.full_chunks, layout.chunk_size), layout.k).reshape(-1))
    if layout.tail:
        parts.append(_bottomk_rows(keys[full:].view(1, layout.tail), layout.k_last).reshape(-1))
    if not parts:  # an empty tensor
        return torch.empty(0, dtype=layout.index_dtype, device=keys.device)
    return torch.cat(parts).to(layout.index_dtype)


def global_positions(index: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """Flat int64 positions of the kept entries (ascending)."""
    index = index.long()
    split = layout.full_chunks * layout.k
    parts = []
    if layout.full_chunks:
        starts = torch.arange(layout.full_chunks, device=index.device).unsqueeze(1) * layout.chunk_size
        parts.append((index[:split].view(layout.full_chunks, layout.k) + starts).reshape(-1))
    if layout.tail:
        parts.append(index[split:] + layout.full_chunks * layout.chunk_size)
    if not parts:
        return torch.empty(0, dtype=torch.long, device=index.device)
    return torch.cat(parts)


def kept_mask(index: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """Boolean tensor of ``layout.numel`` entries, True where an entry is kept."""
    mask = torch.zeros(layout.numel, dtype=torch.bool, device=index.device)
    mask[global_positions(index, layout)] = True
    return mask
