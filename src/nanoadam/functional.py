"""The NanoAdam math on flat tensors: the sparse AdamW update and the mask refresh.

Each operation has a reference implementation in eager PyTorch (``_reference_*``, loop-free over
entries and chunks, any device and dtype) and fused kernels: C++ on the CPU (``nanoadam._cpu``),
Triton on CUDA (``nanoadam.triton_kernels``). :func:`implementation` is the one place that picks
among them, per tensor; ``fused=False`` forces the reference, ``fused=True`` requires a kernel
(the optimizer checks that with :func:`fused_applies` before anything changes). All paths produce
the same masks, cohorts and random numbers exactly and the same update up to float rounding;
``tests/test_functional.py`` and ``tests/test_triton.py`` hold them to that.

Per-entry bias correction. Every kept entry belongs to a refresh *cohort* (``nanoadam.cohorts``),
named in the spare bits of its stored index; its moments are plain Adam moments counted from the
step its cohort was selected, and the update corrects them with its cohort's age
(:class:`UpdateTerms` carries ``lr / (1 - beta1^a)`` and ``sqrt(1 - beta2^a)`` per cohort). A newly
selected entry starts from zero moments in the newest cohort, so it takes exactly Adam's first
step and keeps moving like a fresh Adam afterwards.

bf16 moments are stored with stochastic rounding (``nanoadam.rounding``): with round to nearest a
bf16 ``exp_avg_sq`` never decays at ``beta2 = 0.999``. The random bits are a hash of a per-step
salt and the entry's global position, identical in every path.

A refresh only chooses entries and moves moments (and merges two cohorts when the table is full);
it never reads the gradient, except for ``selection="large_gradients"``.
"""

from __future__ import annotations

import array
import warnings

import torch
from torch.optim.adamw import adamw as _torch_adamw

from . import _cpu
from .masks import Mask, RefreshTerms, UpdateTerms, carry_moments, moment_noise
from .rounding import hash32, round_to
from .selection import (
    WHOLE_TENSOR_SELECTIONS,
    ChunkLayout,
    chunk_bottomk,
    cohort_ids,
    global_positions,
    random_keys,
    selection_keys,
)

__all__ = ["Mask", "RefreshTerms", "UpdateTerms", "carry_moments", "implementation", "fused_applies", "sparse_adamw",
           "refresh_masks", "dense_adamw", "REFERENCE", "CPU_KERNEL", "TRITON"]


# ------------------------------------------------------------------------------------------------
# Which implementation serves a tensor
# ------------------------------------------------------------------------------------------------

REFERENCE, CPU_KERNEL, TRITON = "reference", "cpu", "triton"
_TRITON_DEVICES = ("cuda",)
_TRITON_BROKEN: list[str] = []  # the first Triton failure in this process (then: reference path)


def _is_plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _cpu_kernel_ok(param: torch.Tensor, grad: torch.Tensor, state_dtype: torch.dtype, selection: str | None) -> bool:
    return (
        _cpu.available()
        and param.device.type == "cpu"
        and param.dtype == torch.float32
        and grad.dtype == torch.float32
        and state_dtype in (torch.float32, torch.bfloat16)
        and _is_plain(param)
        and _is_plain(grad)
        and param.is_contiguous()
        and grad.is_contiguous()
        and (selection is None or selection in _cpu.KEY_SOURCES)
    )


def _triton_module():
    """``nanoadam.triton_kernels`` when it can run here (Triton imported on first use), else None."""
    if _TRITON_BROKEN:
        return None
    from . import triton_kernels

    return triton_kernels if triton_kernels.triton_available() else None


def _triton_ok(param: torch.Tensor, grad: torch.Tensor, state_dtype: torch.dtype) -> bool:
    if param.device.type not in _TRITON_DEVICES or (tk := _triton_module()) is None:
        return False
    return tk.tensor_applies(param, grad, state_dtype)


def implementation(param: torch.Tensor, grad: torch.Tensor, state_dtype: torch.dtype, selection: str | None,
                   fused: bool | None) -> str:
    """``REFERENCE``, ``CPU_KERNEL`` or ``TRITON``: which code updates and refreshes this tensor
    (``selection=None``: the update alone). The principal-weight selections refresh on the
    reference path everywhere: an SVD per tensor, a few times a run, is not worth a kernel."""
    if fused is False or selection in WHOLE_TENSOR_SELECTIONS:
        return REFERENCE
    if _triton_ok(param, grad, state_dtype):
        return TRITON
    if _cpu_kernel_ok(param, grad, state_dtype, selection):
        return CPU_KERNEL
    return REFERENCE


def fused_applies(param: torch.Tensor, grad: torch.Tensor, group: dict) -> bool:
    """Whether a fused kernel can serve this parameter under this group's settings."""
    # The principal-weight selections refresh on the reference path by design; fused means their update.
    selection = None if group["selection"] in WHOLE_TENSOR_SELECTIONS else group["selection"]
    return implementation(param, grad, group["state_dtype"], selection, None) != REFERENCE


def triton_failure(error: BaseException) -> None:
    """Records that Triton failed to compile or launch: one warning, then the reference path."""
    if not _TRITON_BROKEN:
        _TRITON_BROKEN.append(repr(error))
        warnings.warn(f"NanoAdam's Triton kernels failed ({error!r}); using the eager PyTorch path from now on",
                      RuntimeWarning, stacklevel=3)


def _by_implementation(impls: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {REFERENCE: [], CPU_KERNEL: [], TRITON: []}
    for i, impl in enumerate(impls):
        out[impl].append(i)
    return out


# ------------------------------------------------------------------------------------------------
# Update
# ------------------------------------------------------------------------------------------------


def sparse_adamw(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    masks: list[Mask],
    terms: list[UpdateTerms],
    impls: list[str],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """AdamW with decoupled weight decay on the kept entries of each tensor, in place, each entry
    bias-corrected for its cohort's age. Entries outside the mask are not read and stay bitwise
    unchanged. Math is float32 whatever the parameter dtype; bf16 moments (and, with
    ``terms[i].param_salt``, bf16 weights) are written with stochastic rounding."""
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    by = _by_implementation(impls)
    if by[TRITON]:
        from . import triton_kernels as tk

        pick = by[TRITON]
        try:
            tk.sparse_adamw_triton(*([x[i] for i in pick] for x in (params, grads, masks, terms)), **hyper)
        except Exception as error:  # a compile or launch failure must not end the user's training
            triton_failure(error)
            by[REFERENCE] += pick
    if by[CPU_KERNEL]:
        _cpu_sparse_adamw(*([x[i] for i in by[CPU_KERNEL]] for x in (params, grads, masks, terms)), **hyper)
    tables: dict = {}  # one bias tensor per distinct cohort table and device
    for i in by[REFERENCE]:
        _reference_sparse_adamw(params[i], grads[i], masks[i], terms[i], **hyper, tables=tables)


def _flat(param: torch.Tensor) -> torch.Tensor:
    return param.view(-1) if param.is_contiguous() else param.reshape(-1)


def _reference_sparse_adamw(param, grad, mask: Mask, terms: UpdateTerms, *, lr, beta1, beta2, eps, weight_decay,
                            tables: dict | None = None):
    flat = _flat(param)
    lay = mask.layout
    raw = mask.index.long()  # decoded once: both readers below take it as it is
    at = global_positions(raw, lay)
    cohort = cohort_ids(raw, lay)
    key = (id(terms.bias), at.device)  # a group may span devices (a model split across GPUs)
    table = None if tables is None else tables.get(key)
    if table is None:
        table = torch.tensor(terms.bias, dtype=torch.float32, device=at.device)
        if tables is not None:
            tables[key] = table
    step_size, bc2_sqrt = table[cohort], table[16 + cohort]
    w = flat[at].float()
    g = grad.reshape(-1)[at].float()
    m = mask.exp_avg.float()
    v = mask.exp_avg_sq.float()
    # The operations of torch.optim.AdamW's single-tensor path, with per-entry bias corrections
    # (``w + (-step_size * m) / denom`` rounds as ``addcdiv_`` does).
    w.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    w = w + (step_size.neg_() * m) / denom
    if flat.dtype == torch.bfloat16 and terms.param_salt is not None:
        w = round_to(w, torch.bfloat16, hash32(at + terms.offset, terms.param_salt) & 0xFFFF)
    flat.index_copy_(0, at, w.to(flat.dtype))
    if flat.data_ptr() != param.data_ptr() or not param.is_contiguous():
        param.copy_(flat.view_as(param))
    noise_m = noise_v = None
    if mask.exp_avg.dtype == torch.bfloat16:
        noise_m, noise_v = moment_noise(at, terms.moment_salt, terms.offset)
    mask.exp_avg.copy_(round_to(m, mask.exp_avg.dtype, noise_m))
    mask.exp_avg_sq.copy_(round_to(v, mask.exp_avg_sq.dtype, noise_v))


def _cpu_sparse_adamw(params, grads, masks, terms, *, lr, beta1, beta2, eps, weight_decay):
    # Tensors whose cohort tables agree (one param group refreshes together) share one bias table,
    # the same tuple object (NanoAdam makes them so; equal tuples that are not shared cost a row).
    slot: dict[int, int] = {}
    rows = []
    for term in terms:
        if id(term.bias) not in slot:
            slot[id(term.bias)] = len(rows)
            rows.append(term.bias)
    tables = torch.tensor(rows, dtype=torch.float32)
    base, row = tables.data_ptr(), tables.stride(0) * tables.element_size()
    words = []
    for p, g, mask, term in zip(params, grads, masks, terms):
        lay = mask.layout
        words += (p.data_ptr(), g.data_ptr(), mask.index.data_ptr(), mask.exp_avg.data_ptr(),
                  mask.exp_avg_sq.data_ptr(), base + row * slot[id(term.bias)], lay.numel, lay.chunk_size, lay.k,
                  lay.k_last, term.offset, mask.index.element_size(), mask.exp_avg.element_size(), lay.position_bits,
                  term.seed)
    _cpu.sparse_adamw(array.array("q", words), decay=1 - lr * weight_decay, one_minus_beta1=1 - beta1, beta2=beta2,
                      one_minus_beta2=1 - beta2, eps=eps, step=terms[0].step)


# ------------------------------------------------------------------------------------------------
# Mask refresh
# ------------------------------------------------------------------------------------------------


def refresh_masks(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    old_masks: list[Mask | None],
    layouts: list[ChunkLayout],
    terms: list[RefreshTerms],
    impls: list[str],
    *,
    selection: str,
    state_dtype: torch.dtype,
    principal_rank: int = 8,
) -> list[Mask]:
    """New masks for ``params``: per chunk, the ``k`` entries chosen by ``selection`` (ties to the
    lower position). Entries kept before and after keep their moments and cohort (those of the
    cohort ``terms[i].merge`` retires join the older one, rescaled); new ones start from zero
    moments in cohort ``terms[i].newborn``. ``grads`` are read only for
    ``selection="large_gradients"``; ``principal_rank`` only by the principal-weight selections. A
    mask whose layout is unchanged may be refreshed in place."""
    out: list[Mask | None] = [None] * len(params)
    by = _by_implementation(impls)
    if by[TRITON]:
        from . import triton_kernels as tk

        pick = by[TRITON]
        try:
            masks = tk.refresh_triton(*([x[i] for i in pick] for x in (params, grads, old_masks, layouts, terms)),
                                      selection=selection, state_dtype=state_dtype)
            for i, mask in zip(pick, masks):
                out[i] = mask
        except Exception as error:
            triton_failure(error)
            by[REFERENCE] += pick
    cpu = [i for i in by[CPU_KERNEL] if _cpu_refresh_ok(old_masks[i], layouts[i], state_dtype)]
    if cpu:
        picked = [(params[i], grads[i], old_masks[i], layouts[i], terms[i]) for i in cpu]
        for i, mask in zip(cpu, _cpu_refresh(*zip(*picked), selection=selection, state_dtype=state_dtype)):
            out[i] = mask
    for i in by[REFERENCE] + [i for i in by[CPU_KERNEL] if i not in set(cpu)]:
        out[i] = _reference_refresh(params[i], grads[i], old_masks[i], layouts[i], terms[i], selection=selection,
                                    state_dtype=state_dtype, principal_rank=principal_rank)
    return out


def _cpu_refresh_ok(old: Mask | None, layout: ChunkLayout, state_dtype: torch.dtype) -> bool:
    return old is None or (old.layout.chunk_size == layout.chunk_size and old.exp_avg.dtype == state_dtype)


def selection_index(param, grad, layout: ChunkLayout, terms: RefreshTerms, selection: str,
                    principal_rank: int = 8) -> torch.Tensor:
    """The reference choice: in-chunk positions (no cohort bits) of the kept entries."""
    if selection == "random":
        keys = random_keys(layout.numel, terms.random_salt, terms.offset, param.device)
    else:
        keys = selection_keys(grad if selection == "large_gradients" else param, selection, principal_rank)
    return chunk_bottomk(keys, layout)


def _reference_refresh(param, grad, old: Mask | None, layout, terms: RefreshTerms, *, selection, state_dtype,
                       principal_rank=8):
    index = selection_index(param, grad, layout, terms, selection, principal_rank)
    return carry_moments(index, layout, old, state_dtype, terms)


def _cpu_refresh(params, grads, old_masks, layouts, terms, *, selection, state_dtype):
    tasks, masks = [], []
    for p, g, old, lay, term in zip(params, grads, old_masks, layouts, terms):
        if old is not None and old.layout == lay and old.exp_avg.dtype == state_dtype:
            index, m, v = old.index, old.exp_avg, old.exp_avg_sq  # refreshed in place
        else:
            index = torch.empty(lay.kept, dtype=lay.index_dtype)
            m = torch.empty(lay.kept, dtype=state_dtype)
            v = torch.empty(lay.kept, dtype=state_dtype)
        filter_ok = old is not None and old.layout.k >= lay.k and old.layout.k_last >= lay.k_last
        merge = term.merge
        tasks.append(
            _cpu.RefreshTask(
                p.data_ptr(), g.data_ptr(), lay.numel, lay.chunk_size,
                old.index.data_ptr() if old else None, old.exp_avg.data_ptr() if old else None,
                old.exp_avg_sq.data_ptr() if old else None, old.layout.k if old else -1,
                old.layout.k_last if old else -1, index.data_ptr(), m.data_ptr(), v.data_ptr(), lay.k,
                lay.k_last, term.offset, old.index.element_size() if old else 2, index.element_size(),
                m.element_size(), lay.position_bits, _cpu.KEY_SOURCES[selection], int(filter_ok), term.newborn,
                merge.young if merge else -1, merge.old if merge else -1, merge.m_factor if merge else 1.0,
                merge.v_factor if merge else 1.0, term.merge_salt,
            )
        )
        masks.append(Mask(index, m, v, lay))
    _cpu.refresh(tasks)
    return masks


# ------------------------------------------------------------------------------------------------
# Dense groups
# ------------------------------------------------------------------------------------------------


def dense_adamw(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps,
                weight_decay, fused: bool | None = None, param_salts: list[int] | None = None) -> None:
    """Plain AdamW (torch's own kernels) for dense groups; increments ``state_steps``. Moments are
    float32; a parameter of lower precision is updated through a float32 copy and written back
    (rounded to nearest, or stochastically for bf16 with ``param_salts``)."""
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
        noise = None
        if param_salts is not None and params[i].dtype == torch.bfloat16:
            at = torch.arange(master.numel(), device=master.device)
            noise = (hash32(at, param_salts[i]) & 0xFFFF).view(master.shape)
        params[i].copy_(round_to(master, params[i].dtype, noise))
