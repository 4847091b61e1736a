"""Chunked per-tensor masks: the layout of the kept entries and the reference selection.

A sparse tensor is flattened and cut into consecutive chunks of ``chunk_size`` entries (the last
one may be shorter). A chunk of length ``L`` keeps ``k = ceil(density * L)`` entries, chosen by
the smallest *key*; ties go to the lower position, so the choice is a deterministic function of
the values. Kept positions are stored per chunk, ascending, which also makes the kept entries
globally ascending.

Each stored index packs two things: the in-chunk position in its low ``position_bits`` and, in
the four bits above, the *cohort* of the entry (which refresh selected it; see
``nanoadam.cohorts``). Chunks of at most 4096 entries use int16 (12 position bits + 4 cohort
bits: the 6 bytes per kept entry of the paper's Appendix G); longer chunks use int32 (27 position
bits), so ``chunk_size`` is at most ``MAX_CHUNK_SIZE = 2**27``. Use :func:`positions` and
:func:`cohort_ids` to read an index; never its raw values.

Everything here is loop-free eager PyTorch and runs on any device; it is the reference for the
fused CPU kernel in ``csrc/cpu_kernels.cpp``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from .rounding import hash32

# LIFT's principal weights (Liu et al., ICML 2025): the largest entries of a rank-r approximation of
# each matrix, chosen over the whole tensor (they cluster on rows and columns, so per-chunk quotas
# would change the rule). "principal_weights_smallest" is what LIFT's released code selects by
# default (``topk(largest=False)`` on the approximation), the opposite of its paper.
WHOLE_TENSOR_SELECTIONS = ("principal_weights", "principal_weights_smallest")
SELECTIONS = ("small_weights", "large_weights", "random", "large_gradients", *WHOLE_TENSOR_SELECTIONS)
INT16_CHUNK_LIMIT = 4096  # 12 position bits; the other 4 of an int16 hold the cohort
MAX_CHUNK_SIZE = 1 << 27  # 27 position bits + 4 cohort bits in an int32
COHORT_BITS = 4
_KEY_MAX = 0x7FFFFFFF


def position_bits(chunk_size: int) -> int:
    """Low bits of a stored index that hold the in-chunk position (the cohort sits above them)."""
    return 12 if chunk_size <= INT16_CHUNK_LIMIT else 27


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

    @property
    def position_bits(self) -> int:
        return position_bits(self.chunk_size)


def positions(index: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """In-chunk positions (int64) of a stored index, cohort bits removed."""
    return index.long() & ((1 << layout.position_bits) - 1)


def cohort_ids(index: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """Cohort of each kept entry (int64 in [0, 16)) of a stored index."""
    return (index.long() >> layout.position_bits) & ((1 << COHORT_BITS) - 1)


def pack_index(pos: torch.Tensor, cohort: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """The stored index of in-chunk positions ``pos`` in cohorts ``cohort`` (two's complement for
    int16: cohorts >= 8 make negative int16 values)."""
    packed = pos.long() | (cohort.long() << layout.position_bits)
    if layout.index_dtype == torch.int16:
        packed = torch.where(packed >= 1 << 15, packed - (1 << 16), packed)
    return packed.to(layout.index_dtype)


def tensor_chunk_size(selection: str, chunk_size: int, numel: int) -> int:
    """The chunk size a tensor of ``numel`` entries is cut with: ``chunk_size``, or for the
    whole-tensor selections the tensor itself (capped at ``MAX_CHUNK_SIZE``)."""
    if selection in WHOLE_TENSOR_SELECTIONS:
        return max(1, min(numel, MAX_CHUNK_SIZE))
    return chunk_size


def principal_scores(values: torch.Tensor, rank: int) -> torch.Tensor:
    """``|W_r|`` flattened: the magnitudes of the rank-``rank`` truncated SVD of ``values`` (2-D or
    more, reshaped to ``(shape[0], -1)`` like a conv weight), computed in float32 with a full,
    deterministic SVD (no random sketch, so no generator is touched). A 1-D tensor is its own
    rank-1 approximation: its score is ``|w|``."""
    w = values.detach().float()
    if w.ndim < 2 or w.numel() == 0:
        return w.abs().reshape(-1)
    matrix = w.reshape(w.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.numel())
    return ((u[:, :r] * s[:r]) @ vh[:r]).abs().reshape(-1)


def selection_keys(values: torch.Tensor, selection: str, rank: int = 8) -> torch.Tensor:
    """Int64 keys of a flat tensor, smaller = selected first: the IEEE bits of ``|x|`` (monotone in
    ``|x|``, NaN above +inf), reversed for the ``large_*`` selections; for the principal-weight
    selections, of ``principal_scores(values, rank)`` (largest first for ``"principal_weights"``)."""
    if selection in WHOLE_TENSOR_SELECTIONS:
        values = principal_scores(values, rank)
    bits = values.detach().float().reshape(-1).view(torch.int32).long() & _KEY_MAX
    return bits if selection in ("small_weights", "principal_weights_smallest") else _KEY_MAX - bits


def random_keys(numel: int, salt: int, offset: int, device: torch.device) -> torch.Tensor:
    """Keys for ``selection="random"``: a hash of ``salt`` (seed and step) and each entry's global
    position ``offset + i``, so shards of one tensor draw what the whole tensor would."""
    at = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    return hash32(at, salt) >> 1


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
    index = positions(index, layout)
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
