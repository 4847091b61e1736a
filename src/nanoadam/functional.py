"""The NanoAdam math on flat tensors: the sparse AdamW update and the mask refresh.

Each operation has a reference implementation in eager PyTorch (``_single_tensor_*``, loop-free
over entries and chunks, any device and dtype) and a fused CPU kernel (``_fused_*``, one pass in
C++ over many tensors). ``fused=None`` picks the kernel wherever it applies (CPU, float32
parameters, contiguous plain tensors, compiled library present) and the reference elsewhere;
``fused=False`` forces the reference. Both produce the same masks exactly and the same update up
to float rounding; ``tests/test_functional.py`` holds them to that.

Moments of newly selected entries. A refresh keeps the moments of entries that stay selected and
starts newly selected ones from zero. Their first update is bias-corrected for their own age (1),
which makes it exactly Adam's first step, of size ``lr * |g| / (|g| + eps) <= lr``; the optimizer-
wide bias correction with the parameter's step ``t`` would instead blow it up by
``sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(1 - b2) / (1 - b1))`` (about 3.2x for the default betas at
large ``t``). To need no per-entry age afterwards, the new entry's moments are stored on the
optimizer-wide scale from then on: before the usual update they are set to
``m = (1 - b1^(t-1)) g`` and ``v = (1 - b2^(t-1)) g^2``, the moments a constant gradient ``g``
would have built over the previous ``t - 1`` steps. At ``t = 1`` this is the zero start of Adam, so
``density=1`` is AdamW step for step. The rule is per entry, so it does not depend on how a tensor
is split into chunks or shards.

Division of work: a refresh only chooses entries and moves moments; it marks each newly selected
entry with ``exp_avg = 0, exp_avg_sq = NEW_ENTRY`` (-1, never a second moment), and the update,
which reads the gradient anyway, gives marked entries their first moments. So the refresh never
touches the gradient (except for ``selection="large_gradients"``), and a mask refresh is always
followed by an update in the same step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.optim.adamw import adamw as _torch_adamw

from . import _cpu
from .selection import ChunkLayout, chunk_bottomk, global_positions, random_keys, selection_keys

NEW_ENTRY = -1.0


class Mask(NamedTuple):
    """The kept entries of one tensor and their moments (the optimizer's per-parameter state)."""

    index: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    layout: ChunkLayout


def _is_plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _kernel_ok(param: torch.Tensor, grad: torch.Tensor, state_dtype: torch.dtype) -> bool:
    return (
        param.device.type == "cpu"
        and param.dtype == torch.float32
        and grad.dtype == torch.float32
        and state_dtype in (torch.float32, torch.bfloat16)
        and _is_plain(param)
        and _is_plain(grad)
        and param.is_contiguous()
        and grad.is_contiguous()
    )


def fused_applies(param: torch.Tensor, grad: torch.Tensor, group: dict) -> bool:
    """Whether a fused kernel (CPU, or Triton on CUDA) can serve this parameter under this group's settings."""
    if param.device.type in _TRITON_DEVICES:
        return _triton_kernels() is not None and _is_plain(param)
    return _cpu.available() and _kernel_ok(param, grad, group["state_dtype"]) and group["selection"] in _cpu.KEY_SOURCES


def _bias_corrections(step: float, beta1: float, beta2: float) -> tuple[float, float]:
    return 1 - beta1**step, (1 - beta2**step) ** 0.5


# ------------------------------------------------------------------------------------------------
# Update
# ------------------------------------------------------------------------------------------------


def sparse_adamw(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    masks: list[Mask],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    fused: bool | None = None,
    rounding_seeds: list[int] | None = None,
) -> None:
    """AdamW with decoupled weight decay on the kept entries of each tensor, in place.

    ``steps[i]`` is tensor ``i``'s step count including this step. Entries outside the mask are
    not read for the update and stay bitwise unchanged. Math is float32 whatever the parameter
    dtype. With ``rounding_seeds`` (one per tensor), updated bfloat16 weights are written with
    stochastic rounding (reference path), so that updates smaller than half a bf16 step are not
    lost on average.
    """
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    if rounding_seeds is not None:
        stochastic = [i for i, p in enumerate(params) if p.dtype == torch.bfloat16]
        for i in stochastic:
            _single_tensor_sparse_adamw(params[i], grads[i], masks[i], steps[i], rounding_seed=rounding_seeds[i],
                                        **hyper)
        rest = [i for i in range(len(params)) if i not in set(stochastic)]
        params, grads, masks, steps = ([x[i] for i in rest] for x in (params, grads, masks, steps))
    if fused is not False:  # CUDA tensors: the Triton kernel (section "CUDA dispatch" below)
        n = len(params)
        params, grads, masks, steps = _triton_sparse_adamw(params, grads, masks, steps, hyper)
        if n and not params:  # all served
            return
    fast, slow = _split(params, grads, masks, fused, lambda p, g, m: _kernel_ok(p, g, m.exp_avg.dtype))
    if fast:
        _fused_sparse_adamw(*zip(*[(params[i], grads[i], masks[i], steps[i]) for i in fast]), **hyper)
    for i in slow:
        _single_tensor_sparse_adamw(params[i], grads[i], masks[i], steps[i], **hyper)


def _split(params, grads, masks, fused, eligible, *extra) -> tuple[list[int], list[int]]:
    """Indices for the fused kernel and for the reference path."""
    if fused is False or not _cpu.available():
        if fused:
            raise RuntimeError("fused=True needs the compiled CPU kernels, which are not installed")
        return [], list(range(len(params)))
    ok = [eligible(*args) for args in zip(params, grads, masks, *extra)]
    if fused and not all(ok):
        raise RuntimeError("fused=True needs contiguous float32 CPU tensors with bf16 or float32 moments "
                           "(and a selection other than 'random')")
    return [i for i, k in enumerate(ok) if k], [i for i, k in enumerate(ok) if not k]


def _flat(param: torch.Tensor) -> torch.Tensor:
    return param.view(-1) if param.is_contiguous() else param.reshape(-1)


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 -> bfloat16, rounding up with probability equal to the fraction cut off: adds a
    uniform random integer below 2^16 to the bits and truncates. Unbiased; inf and NaN pass through."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32, device="cpu").to(x.device)
    rounded = ((bits + noise) & ~0xFFFF).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


def _single_tensor_sparse_adamw(param, grad, mask: Mask, step, *, lr, beta1, beta2, eps, weight_decay,
                                rounding_seed: int | None = None):
    flat = _flat(param)
    at = global_positions(mask.index, mask.layout)
    w = flat[at].float()
    g = grad.reshape(-1)[at].float()
    m = mask.exp_avg.float()
    v = mask.exp_avg_sq.float()
    fresh = v < 0
    if fresh.any():
        m_scale, v_scale = new_entry_scales(step, beta1, beta2)
        m = torch.where(fresh, g * m_scale, m)
        v = torch.where(fresh, (g * v_scale) * g, v)
    # The operation order of torch.optim.AdamW's single-tensor path.
    w.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1, bias_correction2_sqrt = _bias_corrections(step, beta1, beta2)
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    w.addcdiv_(m, denom, value=-lr / bias_correction1)
    if rounding_seed is not None and flat.dtype == torch.bfloat16:
        w = stochastic_round_bf16(w, torch.Generator().manual_seed(rounding_seed))
    flat.index_copy_(0, at, w.to(flat.dtype))
    if flat.data_ptr() != param.data_ptr() or not param.is_contiguous():
        param.copy_(flat.view_as(param))
    mask.exp_avg.copy_(m)
    mask.exp_avg_sq.copy_(v)


def _fused_sparse_adamw(params, grads, masks, steps, *, lr, beta1, beta2, eps, weight_decay):
    tasks = []
    for p, g, mask, step in zip(params, grads, masks, steps):
        bias_correction1, bias_correction2_sqrt = _bias_corrections(step, beta1, beta2)
        m_scale, v_scale = new_entry_scales(step, beta1, beta2)
        lay = mask.layout
        tasks.append(
            _cpu.UpdateTask(
                p.data_ptr(), g.data_ptr(), mask.index.data_ptr(), mask.exp_avg.data_ptr(),
                mask.exp_avg_sq.data_ptr(), lay.numel, lay.chunk_size, lay.k, lay.k_last,
                mask.index.element_size(), mask.exp_avg.element_size(), 1 - lr * weight_decay,
                1 - beta1, beta2, 1 - beta2, eps, lr / bias_correction1, bias_correction2_sqrt,
                m_scale, v_scale,
            )
        )
    _cpu.sparse_adamw(tasks)


# ------------------------------------------------------------------------------------------------
# Mask refresh
# ------------------------------------------------------------------------------------------------


def new_entry_scales(step: float, beta1: float, beta2: float) -> tuple[float, float]:
    """``(1 - b1^(t-1), 1 - b2^(t-1))``: see the module docstring."""
    return 1 - beta1 ** (step - 1), 1 - beta2 ** (step - 1)


def refresh_masks(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    old_masks: list[Mask | None],
    layouts: list[ChunkLayout],
    *,
    selection: str,
    state_dtype: torch.dtype,
    seeds: list[int],
    fused: bool | None = None,
) -> list[Mask]:
    """New masks for ``params``: per chunk, the ``k`` entries chosen by ``selection`` (ties to the
    lower position). Entries kept before and after keep their moments; new ones are marked for
    the update that must follow (module docstring). ``grads`` are read only for
    ``selection="large_gradients"``, ``seeds`` only for ``selection="random"``. A mask whose
    layout is unchanged may be refreshed in place."""

    def eligible(p, g, old, lay):
        return (
            selection in _cpu.KEY_SOURCES
            and _kernel_ok(p, g, state_dtype)
            and (old is None or (old.layout.chunk_size == lay.chunk_size and old.exp_avg.dtype == state_dtype))
        )

    if fused is not False:  # CUDA tensors: the Triton bottom-k (section "CUDA dispatch" below)
        served = _triton_refresh(params, grads, old_masks, layouts, selection, state_dtype, seeds)
        if served:
            rest = [i for i in range(len(params)) if i not in served]
            if rest:
                pick = [[x[i] for i in rest] for x in (params, grads, old_masks, layouts, seeds)]
                masks = refresh_masks(*pick[:4], selection=selection, state_dtype=state_dtype, seeds=pick[4],
                                      fused=fused)
                served.update(zip(rest, masks))
            return [served[i] for i in range(len(params))]
    fast, slow = _split(params, grads, old_masks, fused, eligible, layouts)
    out: list[Mask | None] = [None] * len(params)
    if fast:
        picked = [(params[i], grads[i], old_masks[i], layouts[i]) for i in fast]
        for i, mask in zip(fast, _fused_refresh(*zip(*picked), selection=selection, state_dtype=state_dtype)):
            out[i] = mask
    for i in slow:
        out[i] = _single_tensor_refresh(params[i], grads[i], old_masks[i], layouts[i], selection=selection,
                                        state_dtype=state_dtype, seed=seeds[i])
    return out


def _single_tensor_refresh(param, grad, old: Mask | None, layout, *, selection, state_dtype, seed):
    if selection == "random":
        keys = random_keys(layout.numel, seed, param.device)
    else:
        keys = selection_keys(grad if selection == "large_gradients" else param, selection)
    return carry_moments(chunk_bottomk(keys, layout), layout, old, state_dtype)


def carry_moments(index: torch.Tensor, layout: ChunkLayout, old: Mask | None, state_dtype: torch.dtype) -> Mask:
    """The mask ``index`` with moments: those of entries the old mask kept too, NEW_ENTRY marks
    for the others (kept positions are globally ascending, so a sorted search matches them)."""
    at = global_positions(index, layout)
    m = torch.zeros(layout.kept, device=index.device)
    v = torch.full((layout.kept,), NEW_ENTRY, device=index.device)
    if old is not None:
        old_at = global_positions(old.index, old.layout)
        j = torch.searchsorted(old_at, at).clamp_(max=old_at.numel() - 1)
        kept = old_at[j] == at
        m = torch.where(kept, old.exp_avg[j].float(), m)
        v = torch.where(kept, old.exp_avg_sq[j].float(), v)
    return Mask(index, m.to(state_dtype), v.to(state_dtype), layout)


def _fused_refresh(params, grads, old_masks, layouts, *, selection, state_dtype):
    tasks, masks = [], []
    for p, g, old, lay in zip(params, grads, old_masks, layouts):
        if old is not None and old.layout == lay and old.exp_avg.dtype == state_dtype:
            index, m, v = old.index, old.exp_avg, old.exp_avg_sq  # refreshed in place
        else:
            index = torch.empty(lay.kept, dtype=lay.index_dtype)
            m = torch.empty(lay.kept, dtype=state_dtype)
            v = torch.empty(lay.kept, dtype=state_dtype)
        filter_ok = old is not None and old.layout.k >= lay.k and old.layout.k_last >= lay.k_last
        tasks.append(
            _cpu.RefreshTask(
                p.data_ptr(), g.data_ptr(), lay.numel, lay.chunk_size,
                old.index.data_ptr() if old else None, old.exp_avg.data_ptr() if old else None,
                old.exp_avg_sq.data_ptr() if old else None, old.layout.k if old else -1,
                old.layout.k_last if old else -1, old.index.element_size() if old else 2,
                _cpu.KEY_SOURCES[selection], index.data_ptr(), m.data_ptr(), v.data_ptr(), lay.k,
                lay.k_last, index.element_size(), m.element_size(), int(filter_ok), 0,
            )
        )
        masks.append(Mask(index, m, v, lay))
    _cpu.refresh(tasks)
    return masks


# ------------------------------------------------------------------------------------------------
# CUDA dispatch: the Triton kernels of nanoadam.triton_kernels serve CUDA tensors whenever
# triton_kernels.triton_available() (Triton imports, CUDA is there) and fused is not False; the
# CPU paths above are unchanged and fused=False still means the eager reference everywhere.
# ------------------------------------------------------------------------------------------------

_TRITON_DEVICES = ("cuda",)


def _triton_kernels():
    """The ``triton_kernels`` module when it can run here, else None (Triton imported on first use)."""
    from . import triton_kernels

    return triton_kernels if triton_kernels.triton_available() else None


def _triton_sparse_adamw(params, grads, masks, steps, hyper):
    """Runs the Triton update on the tensors it serves; returns the others' lists."""
    if not any(p.device.type in _TRITON_DEVICES for p in params) or (tk := _triton_kernels()) is None:
        return params, grads, masks, steps
    ok = [p.device.type in _TRITON_DEVICES and _is_plain(p) and tk.update_applies(p, g, m)
          for p, g, m in zip(params, grads, masks)]
    if any(ok):
        tk.sparse_adamw_triton(*([x[i] for i in range(len(ok)) if ok[i]] for x in (params, grads, masks, steps)),
                               **hyper)
    return tuple([x[i] for i in range(len(ok)) if not ok[i]] for x in (params, grads, masks, steps))


def _triton_refresh(params, grads, old_masks, layouts, selection, state_dtype, seeds) -> dict[int, Mask]:
    """New masks, by position in ``params``, for the tensors the Triton bottom-k serves."""
    if not any(p.device.type in _TRITON_DEVICES for p in params) or (tk := _triton_kernels()) is None:
        return {}
    picked = [
        i for i, (p, g, old) in enumerate(zip(params, grads, old_masks))
        if p.device.type in _TRITON_DEVICES and _is_plain(p) and (selection != "large_gradients" or _is_plain(g))
        and (old is None or old.index.device == p.device)
    ]
    masks = tk.refresh_triton(*([x[i] for i in picked] for x in (params, grads, old_masks, layouts)),
                              selection=selection, state_dtype=state_dtype, seeds=[seeds[i] for i in picked])
    return dict(zip(picked, masks))


# ------------------------------------------------------------------------------------------------
# Dense groups
# ------------------------------------------------------------------------------------------------


def dense_adamw(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps,
                weight_decay, fused: bool | None = None, rounding_seeds: list[int] | None = None) -> None:
    """Plain AdamW (torch's own kernels) for dense groups; increments ``state_steps``. Moments are
    float32; a parameter of lower precision is updated through a float32 copy and written back
    (rounded to nearest, or stochastically with ``rounding_seeds``)."""
    full = [i for i, p in enumerate(params) if p.dtype == torch.float32]
    low = [i for i, p in enumerate(params) if p.dtype != torch.float32]
    hyper = dict(amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=False)
    if full:
        picked = [[x[i] for i in full] for x in (params, grads, exp_avgs, exp_avg_sqs, state_steps)]
        use_fused = fused is not False and all(p.device.type in ("cpu", "cuda") and _is_plain(p) for p in picked[0])
        _torch_adamw(*picked[:4], [], picked[4], foreach=False if not use_fused else None, fused=use_fused or None,
                     **hyper)
    for i in low:
        master = params[i].detach().float()
        _torch_adamw([master], [grads[i].float()], [exp_avgs[i]], [exp_avg_sqs[i]], [], [state_steps[i]],
                     foreach=False, **hyper)
        if rounding_seeds is not None and params[i].dtype == torch.bfloat16:
            master = stochastic_round_bf16(master, torch.Generator().manual_seed(rounding_seeds[i]))
        params[i].copy_(master)
