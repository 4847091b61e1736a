"""NanoAdam state for DTensor parameters (FSDP2 ``fully_shard``, tensor parallelism).

Each rank selects and updates within its local shard, chunking the shard; nothing is
communicated. ``torch.distributed.checkpoint`` needs per-shard state to be a DTensor too, with one
global shape on every rank. So the kept positions and moments of a shard are stored as the local
row of a ``(shards, K_max)`` DTensor sharded on dim 0 (replicated over replicate mesh dims):
``K_max`` is what the largest shard keeps, computable on every rank without communication, and a
smaller shard leaves the end of its row unused. Resuming therefore needs the same sharding (mesh
and placements) as when saving.
"""

from __future__ import annotations

import math

import torch

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch without distributed
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def max_local_numel(p) -> int:
    """Entries in the largest local shard of a DTensor (torch.chunk-style sharding)."""
    shape = list(p.shape)
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            size = p.device_mesh.size(mesh_dim)
            shape[placement.dim] = math.ceil(shape[placement.dim] / size)
    return math.prod(shape)


def state_dtensor(p, row: torch.Tensor, length: int):
    """A ``(shards, length)`` DTensor whose local row starts with ``row`` (padded with zeros)."""
    padded = torch.zeros(1, length, dtype=row.dtype, device=row.device)
    padded[0, : row.numel()] = row
    placements = [Shard(0) if isinstance(pl, Shard) else Replicate() for pl in p.placements]
    return DTensor.from_local(padded, p.device_mesh, placements, run_check=False)


def local_row(t, kept: int) -> torch.Tensor:
    """The first ``kept`` entries of this rank's row: a view, updates write through."""
    return t.to_local().view(-1)[:kept]


def replace_local(t, local_tensor: torch.Tensor):
    """``t`` with its local tensor replaced (same mesh and placements); plain tensors pass through."""
    if not is_dtensor(t):
        return local_tensor
    return DTensor.from_local(local_tensor, t.device_mesh, t.placements, run_check=False)


def global_offset(p) -> int:
    """Flat position, in the whole tensor, of the first entry of this rank's shard (0 for plain
    tensors). Exact for shards along dim 0 (FSDP2), where a shard is one contiguous range; for
    other placements it is the position of the shard's first entry."""
    if not is_dtensor(p):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offsets = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    stride, flat = 1, 0
    for size, off in zip(reversed(p.shape), reversed(offsets)):
        flat += off * stride
        stride *= size
    return int(flat)
