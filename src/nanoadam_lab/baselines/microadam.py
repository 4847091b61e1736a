r"""MicroAdam (Modoranu et al., NeurIPS 2024), ported to plain PyTorch.

Why this file exists: the official optimizer (``ista_daslab_optimizers.MicroAdam``, repository
IST-DASLab/ISTA-DASLab-Optimizers) runs only on CUDA, through custom kernels. The comparisons of this
project also run on CPU, so this module re-implements the same algorithm with ordinary tensor
operations. It is written for fidelity, not speed: how fast it runs on a CPU says nothing about the
speed of the official CUDA kernels, and its timings must never be reported as MicroAdam's.

Algorithm, per parameter tensor flattened to ``d`` entries, at that tensor's step ``t``:

1. ``a = grad + Qinv(e)``: the gradient plus the dequantized 4-bit error feedback (float32 math).
2. ``a`` is cut into blocks of ``block_size`` entries (the last may be shorter). In a block of ``L``
   entries the ``k = ceil(density * L)`` entries of largest ``|a|`` are kept: their in-block indices
   (int16) and values ``a[idx]`` (bfloat16) are written to row ``(t - 1) % m`` of the ring buffers
   ``I`` and ``V`` (shape ``[m, K]``, ``K`` = kept entries per tensor, blocks side by side).
3. The kept entries of ``a`` are zeroed and the rest becomes the new error ``e``: 4-bit asymmetric
   quantization per bucket of ``quant_bucket`` entries, ``code = floor((a - min) / u + 1/2)`` with
   ``u = (max - min) / 15``, clamped to 0..15 (a bucket with ``max == min`` gets code 0); two codes
   per byte, the even entry in the high nibble. ``Qinv(e) = min + code * u``.
4. Adam statistics are rebuilt from the ``min(t, m)`` rows written so far, a row of age ``s`` (0 for
   this step) weighing ``b1^s`` (``b2^s`` for the squares):
   ``m_hat = (1 - b1) / (1 - b1^t) * sum_s b1^s V_s``, ``v_hat = (1 - b2) / (1 - b2^t) * sum_s b2^s V_s^2``,
   each ``V_s`` scattered to the positions its ``I_s`` names.
5. ``u = m_hat / (eps + sqrt(v_hat))`` and ``w <- w * (1 - lr * weight_decay) - lr * u``.

State per parameter (``numel = d``), nothing else (see :meth:`MicroAdam.expected_state_bytes`):

* ``step``: int64, shape ``[]``, on the CPU: 8 bytes;
* ``error``: uint8 ``[ceil(d / 2)]``, the packed 4-bit codes: ``ceil(d / 2)`` bytes;
* ``min_vals``, ``max_vals``: bf16 ``[nb]``, ``nb = ceil(d / quant_bucket)``: ``2 nb`` bytes each;
* ``I``: int16 ``[m, K]`` and ``V``: bf16 ``[m, K]``: ``2 m K`` bytes each.

For the paper's setting (``m = 10``, ``density = 0.01``, ``quant_bucket = 64``) that is about
``0.5 d + 4 m K + 4 d / 64 ~= 0.96 d`` bytes, against ``8 d`` for AdamW's two float32 moments.

The ring position is ``(step - 1) % m``; columns ``[j k_full, (j + 1) k_full)`` of ``I``/``V`` belong to
block ``j`` (``k_full = ceil(density * block_size)``), the last ``ceil(density * tail)`` columns to the
shorter tail block, if any.

Deviations from the official implementation, all deliberate:

* Arithmetic. The official optimizer requires bf16 gradients and forms ``a`` in place in bf16; here
  ``a``, the statistics and the update are float32 (the stored window values are bf16 as there).
  Since ``a`` is not bf16, the per-bucket min/max are rounded outward to bf16 (min down, max up), so
  every entry lies inside its bucket's stored range, and ``Q``/``Qinv`` both use the stored values: the
  error of every entry is at most half a quantization step, as in the official kernels where the
  bf16 min/max are exact.
* A bucket with ``max == min`` gets code 0 (the official kernel divides by zero there), and codes are
  clamped to 0..15 against float rounding.
* ``p.grad`` is left untouched; the official optimizer overwrites it with ``a`` and then the update.
* The step counter is per parameter (as in ``torch.optim.AdamW``). It equals the official global
  counter whenever every parameter receives a gradient at every step; when one is skipped, the
  official code keeps counting globally while its ring pointer stands still, which shifts the ages of
  that tensor's window rows. Here a skipped tensor is left exactly as it was.
* The top-k block size is a hyperparameter (``block_size``, at most 32768 so that in-block indices
  fit int16); the official code derives it from the GPU's shared memory per thread block.
  ``min_vals``/``max_vals`` hold ``ceil(d / quant_bucket)`` entries (the official code allocates
  ``floor(d / quant_bucket) + 1``, one unused when the bucket divides ``d``).
* ``lr``, ``betas``, ``eps`` and ``weight_decay`` are read from the param group at every step (the
  official code keeps betas and eps global and weight decay as it was at construction).
* State is created at a parameter's first step with a gradient, not at construction; empty tensors
  are skipped. With ``eps == 0`` entries outside the window get a zero update instead of ``0/0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from nanoadam._validation import CheckedOptimizer, check_adam_hyperparameters, check_positive_int, is_int

__all__ = [
    "MicroAdam",
    "block_layout",
    "block_offsets",
    "block_topk",
    "dequantize",
    "quantize",
    "window_statistics",
]

INT16_BLOCK_LIMIT = 32768  # in-block indices 0..32767 fit int16
_LEVELS = 15  # 4 bits: codes 0..15
_STATE_KEYS = ("step", "error", "min_vals", "max_vals", "I", "V")


# -- layout ---------------------------------------------------------------------------------------


def block_layout(numel: int, block_size: int, density: float) -> tuple[int, int, int, int]:
    """``(full_blocks, k_full, tail, k_tail)`` of a flat tensor of ``numel`` entries.

    ``full_blocks`` blocks of ``block_size`` entries keep ``k_full = ceil(density * block_size)`` each;
    the ``tail = numel % block_size`` last entries (if any) form a shorter block keeping
    ``k_tail = ceil(density * tail)``. A tensor smaller than one block is a single block of ``numel``
    entries, as in the official code.
    """
    full, tail = divmod(numel, block_size)
    k_full = math.ceil(density * block_size) if full else 0
    k_tail = math.ceil(density * tail) if tail else 0
    return full, k_full, tail, k_tail


def kept_per_tensor(numel: int, block_size: int, density: float) -> int:
    """``K``: entries kept per step (the width of the window buffers)."""
    full, k_full, _, k_tail = block_layout(numel, block_size, density)
    return full * k_full + k_tail


def block_offsets(
    numel: int, block_size: int, density: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """int64 ``[K]``: the flat position of the first entry of the block each window column belongs to."""
    full, k_full, _, k_tail = block_layout(numel, block_size, density)
    offsets = torch.arange(full, dtype=torch.int64, device=device).mul_(block_size).repeat_interleave(k_full)
    if k_tail:
        offsets = torch.cat([offsets, torch.full((k_tail,), full * block_size, dtype=torch.int64, device=device)])
    return offsets


# -- the math, over flat tensors ------------------------------------------------------------------


def block_topk(a: torch.Tensor, block_size: int, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of ``a`` (flat), the ``ceil(density * L)`` entries of largest ``|a|``.

    Returns ``(in_block, positions)``, both int64 ``[K]``: indices inside each block (blocks side by
    side, in block order; unsorted within a block) and the matching flat positions in ``a``.
    """
    if a.dim() != 1:
        raise ValueError(f"block_topk expects a flat tensor, got shape {tuple(a.shape)}")
    full, k_full, tail, k_tail = block_layout(a.numel(), block_size, density)
    parts = []
    if full:
        blocks = a[: full * block_size].abs().view(full, block_size)
        parts.append(torch.topk(blocks, k_full, dim=1, sorted=False).indices.reshape(-1))
    if tail:
        parts.append(torch.topk(a[full * block_size :].abs(), k_tail, sorted=False).indices)
    in_block = torch.cat(parts) if parts else a.new_zeros(0, dtype=torch.int64)
    positions = in_block + block_offsets(a.numel(), block_size, density, device=a.device)
    return in_block, positions


def _round_outward_bf16(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 ``lo' <= lo`` and ``hi' >= hi``, each the nearest such bf16 value."""
    lo_b, hi_b = lo.to(torch.bfloat16), hi.to(torch.bfloat16)
    lo_b = torch.where(lo_b.float() > lo, torch.nextafter(lo_b, torch.full_like(lo_b, -math.inf)), lo_b)
    hi_b = torch.where(hi_b.float() < hi, torch.nextafter(hi_b, torch.full_like(hi_b, math.inf)), hi_b)
    return lo_b, hi_b


def _per_bucket(x: torch.Tensor, bucket: int) -> torch.Tensor:
    """``x`` (flat) as ``[ceil(n / bucket), bucket]``, the last bucket padded with its own last entry."""
    n = x.numel()
    pad = -n % bucket
    if pad:
        x = torch.cat([x, x[-1:].expand(pad)])
    return x.view(-1, bucket)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 (flat) to ``ceil(n / 2)`` bytes, entry ``2i`` in the high nibble of byte ``i``."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n]


def quantize(x: torch.Tensor, bucket: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit asymmetric quantization of flat ``x`` per bucket of ``bucket`` entries.

    Returns ``(packed, min_vals, max_vals)``: uint8 ``[ceil(n / 2)]`` and bf16 ``[ceil(n / bucket)]``.
    The bucket range is rounded outward to bf16 and the codes are computed from the stored bf16 values,
    so ``dequantize`` is within half a step ``(max - min) / 30`` of every entry.
    """
    if x.dim() != 1:
        raise ValueError(f"quantize expects a flat tensor, got shape {tuple(x.shape)}")
    n = x.numel()
    if n == 0:
        empty = x.new_zeros(0, dtype=torch.bfloat16)
        return x.new_zeros(0, dtype=torch.uint8), empty, empty.clone()
    buckets = _per_bucket(x.float(), bucket)
    min_vals, max_vals = _round_outward_bf16(buckets.amin(dim=1), buckets.amax(dim=1))
    lo = min_vals.float().unsqueeze(1)
    step = (max_vals.float().unsqueeze(1) - lo) / _LEVELS
    codes = torch.floor((buckets - lo) / step + 0.5).clamp_(0, _LEVELS)
    codes = torch.where(step > 0, codes, 0.0)
    codes = codes.to(torch.uint8).reshape(-1)[:n]
    return _pack(codes), min_vals, max_vals


def dequantize(
    packed: torch.Tensor, min_vals: torch.Tensor, max_vals: torch.Tensor, n: int, bucket: int
) -> torch.Tensor:
    """float32 ``[n]``: ``min + code * (max - min) / 15`` with each entry's bucket min/max."""
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=packed.device)
    codes = _per_bucket(_unpack(packed, n).float(), bucket)
    lo = min_vals.float().unsqueeze(1)
    step = (max_vals.float().unsqueeze(1) - lo) / _LEVELS
    return (lo + codes * step).reshape(-1)[:n]


def window_statistics(
    indices: torch.Tensor,
    values: torch.Tensor,
    step: int,
    numel: int,
    block_size: int,
    density: float,
    beta1: float,
    beta2: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bias-corrected Adam moments ``(m_hat, v_hat)`` (dense float32 ``[numel]``) of the window.

    ``indices``/``values`` are the ring buffers ``[m, K]`` after step ``step`` wrote row
    ``(step - 1) % m``; the ``min(step, m)`` rows written so far are used, the row of age ``s`` with
    weights ``b1^s`` and ``b2^s``. Rows are accumulated in row order, as the official kernel does.
    """
    m = indices.shape[0]
    offsets = block_offsets(numel, block_size, density, device=values.device)
    m_acc = torch.zeros(numel, dtype=torch.float32, device=values.device)
    v_acc = torch.zeros(numel, dtype=torch.float32, device=values.device)
    for row in range(min(step, m)):
        age = (step - 1 - row) % m
        positions = indices[row].long() + offsets
        vals = values[row].float()
        m_acc.index_add_(0, positions, vals, alpha=beta1**age)
        v_acc.index_add_(0, positions, vals * vals, alpha=beta2**age)
    m_acc.mul_((1.0 - beta1) / (1.0 - beta1**step))
    v_acc.mul_((1.0 - beta2) / (1.0 - beta2**step))
    return m_acc, v_acc


# -- the optimizer --------------------------------------------------------------------------------


def _check_hyperparameters(h: dict[str, Any]) -> None:
    """Raises ValueError/TypeError naming the first bad hyperparameter in ``h``."""
    check_adam_hyperparameters(h)
    check_positive_int(h, "m", "an int >= 1, the window size")
    if "block_size" in h:
        bs = h["block_size"]
        if not is_int(bs):
            raise TypeError(f"Invalid block_size: {bs!r} (expected an int in [1, {INT16_BLOCK_LIMIT}])")
        if not 1 <= bs <= INT16_BLOCK_LIMIT:
            raise ValueError(f"Invalid block_size: {bs} (expected an int in [1, {INT16_BLOCK_LIMIT}], so that "
                             "in-block indices fit int16)")
    check_positive_int(h, "quant_bucket")


def _scalar(x: Any) -> float:
    return x.item() if isinstance(x, torch.Tensor) else float(x)


class MicroAdam(CheckedOptimizer):
    r"""MicroAdam: Adam over a window of the last ``m`` top-k sparse gradients with 4-bit error feedback.

    A CPU-capable port of ``ista_daslab_optimizers.MicroAdam``; the algorithm, the state layout and
    the deviations from the official code are described in :mod:`nanoadam_lab.baselines.microadam`.

    Args:
        params: parameters or parameter groups; every argument below may be set per group, but the
            layout arguments (``m``, ``density``, ``block_size``, ``quant_bucket``) cannot change once a
            parameter has state.
        lr: learning rate.
        betas: coefficients of the window averages of the gradient and its square.
        eps: term added to the denominator.
        weight_decay: decoupled weight decay, applied to every entry.
        m: window size (sparse gradients kept).
        density: fraction of each block kept per step (``k = ceil(density * L)``), ``0 < density <= 1``.
        block_size: entries per top-k block, at most 32768 (in-block indices are int16).
        quant_bucket: entries per quantization bucket of the error feedback.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        m: int = 10,
        density: float = 0.01,
        block_size: int = 4096,
        quant_bucket: int = 64,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, m=m, density=density,
                                      block_size=block_size, quant_bucket=quant_bucket))

    check_hyperparameters = staticmethod(_check_hyperparameters)

    # -- state --------------------------------------------------------------------------------

    @staticmethod
    def expected_state_bytes(numel: int, m: int = 10, density: float = 0.01, block_size: int = 4096,
                             quant_bucket: int = 64) -> int:
        """Exact bytes of the state of one tensor of ``numel`` entries (see the module docstring)."""
        if numel == 0:
            return 0
        k = kept_per_tensor(numel, block_size, density)
        buckets = -(-numel // quant_bucket)
        return 8 + (numel + 1) // 2 + 2 * buckets + 2 * buckets + 2 * m * k + 2 * m * k

    def state_bytes(self) -> int:
        """Bytes held by all state tensors (``numel * element_size``)."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        d = p.numel()
        k = kept_per_tensor(d, group["block_size"], group["density"])
        buckets = -(-d // group["quant_bucket"])
        dev = p.device
        state = self.state[p]
        state["step"] = torch.tensor(0, dtype=torch.int64)
        state["error"] = torch.zeros((d + 1) // 2, dtype=torch.uint8, device=dev)
        state["min_vals"] = torch.zeros(buckets, dtype=torch.bfloat16, device=dev)
        state["max_vals"] = torch.zeros(buckets, dtype=torch.bfloat16, device=dev)
        state["I"] = torch.zeros(group["m"], k, dtype=torch.int16, device=dev)
        state["V"] = torch.zeros(group["m"], k, dtype=torch.bfloat16, device=dev)
        return state

    @staticmethod
    def _check_state(state: dict[str, Any], p: torch.Tensor, group: dict[str, Any], where: str) -> None:
        d = p.numel()
        k = kept_per_tensor(d, group["block_size"], group["density"])
        buckets = -(-d // group["quant_bucket"])
        expected = {"error": ((d + 1) // 2,), "min_vals": (buckets,), "max_vals": (buckets,),
                    "I": (group["m"], k), "V": (group["m"], k)}
        for key in _STATE_KEYS:
            if key not in state:
                raise ValueError(f"state of {where} has no {key!r}; it was not written by MicroAdam")
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(f"state {key!r} of {where} has shape {tuple(state[key].shape)}, expected {shape}: "
                                 "m, density, block_size and quant_bucket cannot change once training started")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, keeping the saved dtypes of the state.

        torch casts every state tensor but ``step`` to a floating-point parameter's dtype, which would
        turn the uint8/int16/bf16 buffers into, say, float32 (and lose int16 indices above 256 for a
        bf16 parameter). After torch has matched the saved state to the parameters, each tensor is
        replaced by a copy of the saved one, in its saved dtype, on the parameter's device (``step``
        stays on the CPU).
        """
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        id_map = {old: p for g_old, g in zip(saved_groups, self.param_groups)
                  for old, p in zip(g_old["params"], g["params"])}
        for key, saved in saved_state.items():
            p = id_map.get(key)
            if p is None or not isinstance(saved, dict):
                continue
            restored = self.state[p]
            for name, value in saved.items():
                if isinstance(value, torch.Tensor):
                    device = torch.device("cpu") if name == "step" else p.device
                    restored[name] = value.detach().to(device=device, dtype=value.dtype, copy=True)

    # -- step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._collect()
        for group, p in work:
            state = self.state[p]
            if not state:
                state = self._init_state(p, group)
            self._update(p, state, group)
        return loss

    def _collect(self) -> list[tuple[dict[str, Any], torch.Tensor]]:
        """Params to update, every one checked before anything changes."""
        work = []
        for gi, group in enumerate(self.param_groups):
            _check_hyperparameters(group)
            for pi, p in enumerate(group["params"]):
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"MicroAdam does not support sparse gradients (param {pi} of group {gi})")
                if p.grad.shape != p.shape:
                    raise ValueError(f"grad of param {pi} in group {gi} has shape {tuple(p.grad.shape)}, "
                                     f"expected {tuple(p.shape)}")
                state = self.state.get(p)
                if state:
                    self._check_state(state, p, group, f"param {pi} of group {gi}")
                work.append((group, p))
        return work

    def _update(self, p: torch.Tensor, state: dict[str, torch.Tensor], group: dict[str, Any]) -> None:
        d = p.numel()
        m, density, block_size, bucket = group["m"], group["density"], group["block_size"], group["quant_bucket"]
        beta1, beta2 = (float(b) for b in group["betas"])
        lr, eps, wd = _scalar(group["lr"]), _scalar(group["eps"]), _scalar(group["weight_decay"])

        state["step"] = state["step"] + 1
        t = int(state["step"].item())
        row = (t - 1) % m

        # 1. corrected gradient
        a = p.grad.detach().reshape(-1).to(torch.float32, copy=True)
        a.add_(dequantize(state["error"], state["min_vals"], state["max_vals"], d, bucket))
        # 2. top-k per block into the ring buffers
        in_block, positions = block_topk(a, block_size, density)
        state["I"][row].copy_(in_block.to(torch.int16))
        state["V"][row].copy_(a[positions].to(torch.bfloat16))
        # 3. the rest is the new error
        a[positions] = 0.0
        state["error"], state["min_vals"], state["max_vals"] = quantize(a, bucket)
        del a
        # 4. statistics from the window
        m_hat, v_hat = window_statistics(state["I"], state["V"], t, d, block_size, density, beta1, beta2)
        # 5. update
        denom = v_hat.sqrt_().add_(eps)
        update = m_hat.div_(denom)
        if eps == 0.0:
            update = torch.where(denom > 0, update, 0.0)
        if wd != 0.0:
            p.mul_(1.0 - lr * wd)
        p.add_(update.view(p.shape).to(p.dtype), alpha=-lr)
