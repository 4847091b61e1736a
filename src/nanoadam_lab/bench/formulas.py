"""Optimizer-state bytes from formulas: the paper's Appendix G closed forms, and each optimizer's
documented storage layout evaluated on a model's tensor shapes.

Two levels: ``paper_formula_bytes`` is the paper's closed form for a model of ``N`` parameters
(it ignores small per-block bookkeeping such as quantization scales); ``layout_formula_bytes``
counts, from the shapes, the bytes each optimizer's layout needs, including that bookkeeping.
The second is what measured state is compared against (``bench/optimizers.py``,
``bench/memory.py``). A leaf module: nothing here runs an optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nanoadam.selection import ChunkLayout, tensor_chunk_size


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    sparse: bool = True  # NanoAdam: in the sparse group (not head / norm)
    galore: bool = False  # GaLore projects this tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def paper_formula_bytes(name: str, n: float, *, density: float = 0.1, window: int = 10,
                        micro_density: float = 0.01, galore_rank: int = 8, hidden: int = 4096) -> float:
    """Appendix G's optimizer-state bytes for ``n`` parameters (GaLore: every parameter in
    ``hidden x hidden`` matrices projected to rank ``galore_rank``)."""
    formulas = {
        "adamw (fp32 moments)": 8 * n,
        "adamw (bf16 moments)": 4 * n,
        "adamw8bit": 2 * n,
        "galore": 4 * (galore_rank * hidden + 2 * hidden * galore_rank) / hidden**2 * n,
        "microadam": 0.5 * n + 4 * window * micro_density * n,
        "nanoadam": 6 * density * n,
    }
    return formulas[name]


def _microadam_bytes(numel: int, window: int, density: float, block_size: int, bucket: int) -> int:
    kept = ChunkLayout.build(numel, block_size, density).kept
    return math.ceil(numel / 2) + 4 * window * kept + 4 * math.ceil(numel / bucket)


def layout_formula_bytes(name: str, tensors: list[TensorInfo], hyper: dict) -> int:
    """State bytes that optimizer ``name`` needs for ``tensors`` under its documented layout."""
    total = 0
    if name == "adamw8bit" and any(t.numel >= hyper.get("min_8bit_size", 4096) for t in tensors):
        total += 2 * 256 * 4  # the two 256-entry quantization maps, shared by all tensors
    moment = hyper.get("moment_bytes", 4)  # torch's AdamW and galore-torch: the parameters' dtype
    for t in tensors:
        d = t.numel
        if name in ("adamw", "adamw-headlr", "head-only"):  # head-only: the frozen body has no state
            total += 2 * moment * d + 4  # two moments, a float32 step
        elif name == "adamw8bit":
            if d >= hyper.get("min_8bit_size", 4096):  # uint8 moments, an fp32 absmax per 256 entries each
                total += 2 * d + 8 * math.ceil(d / 256)
            else:
                total += 8 * d
        elif name == "galore":
            if t.galore:
                rows, cols = t.shape
                r = min(hyper.get("rank", 8), rows, cols)
                low_rank = rows * r if rows >= cols else r * cols
                # galore-torch 1.0 keeps the rank-r projection as a view of the whole SVD factor
                # (Vh or U, min(rows, cols) squared floats), which stays allocated.
                projection = min(rows, cols) ** 2
                total += moment * (projection + 2 * low_rank)
            else:
                total += 2 * moment * d
        elif name == "microadam":
            total += _microadam_bytes(d, hyper.get("m", 10), hyper.get("density", 0.01), hyper.get("block_size", 4096),
                                      hyper.get("quant_bucket", 64)) + 4
        elif name in ("nanoadam", "nanoadam-static", "lift"):
            if t.sparse:
                selection = hyper.get("selection", "small_weights")
                chunk = tensor_chunk_size(selection, hyper.get("chunk_size", 4096), d)
                layout = ChunkLayout.build(d, chunk, hyper.get("density", 0.1))
                index_bytes = layout.index_dtype.itemsize  # int16 up to 4096-entry chunks, int32 beyond
                state_bytes = 2 if str(hyper.get("state_dtype", "bfloat16")).endswith("bfloat16") else 4
                # + step, mask density, chunk size, and the table of 16 cohort births (int64)
                total += layout.kept * (index_bytes + 2 * state_bytes) + 4 + 8 + 8 + 16 * 8
            else:
                total += 8 * d + 4
        else:
            raise ValueError(f"no formula for {name!r}")
    return total
