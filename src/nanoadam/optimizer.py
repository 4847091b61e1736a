"""``NanoAdam``: AdamW on the smallest weights of each tensor, with moments for those alone.

The class validates hyperparameters, groups parameters and keeps state; the math is in
``nanoadam.functional``, the cohort bookkeeping in ``nanoadam.cohorts``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from . import _cpu
from . import _dtensor as _dt
from ._validation import CheckedOptimizer, check_adam_hyperparameters, check_positive_int, is_number
from .cohorts import COHORTS, admit, bias_table, new_table
from .functional import (
    Mask,
    RefreshTerms,
    UpdateTerms,
    dense_adamw,
    fused_applies,
    implementation,
    refresh_masks,
    sparse_adamw,
)
from .rounding import STREAM_MERGE, STREAM_PARAM, STREAM_RANDOM, salt
from .selection import (
    INT16_CHUNK_LIMIT,
    MAX_CHUNK_SIZE,
    SELECTIONS,
    WHOLE_TENSOR_SELECTIONS,
    ChunkLayout,
    cohort_ids,
    positions,
    tensor_chunk_size,
)

_STATE_DTYPES = (torch.bfloat16, torch.float32)
# Per-parameter bookkeeping of sparse tensors, read on the host every step.
_HOST_KEYS = ("step", "mask_density", "mask_chunk_size", "cohort_born")
# Group keys added after the first release, with the value that reproduces a checkpoint made
# before they existed (torch's optimizers fill such keys in __setstate__ too).
_LATER_GROUP_KEYS = {"stochastic_rounding": False, "fused": None, "principal_rank": 8}
# Before cohorts (state without "cohort_born"), chunks of up to this many entries used int16.
_OLD_INT16_CHUNK_LIMIT = 32768


def _check_hyperparameters(h: dict[str, Any]) -> None:
    """Raises ValueError/TypeError naming the first bad hyperparameter in ``h``."""
    check_adam_hyperparameters(h)
    if "mask_interval" in h and h["mask_interval"] is not None:
        check_positive_int(h, "mask_interval", "an int >= 1, or None for a static mask")
    check_positive_int(h, "chunk_size")
    check_positive_int(h, "principal_rank")
    if "chunk_size" in h and h["chunk_size"] > MAX_CHUNK_SIZE:
        raise ValueError(f"Invalid chunk_size: {h['chunk_size']} (expected at most {MAX_CHUNK_SIZE} = 2**27; "
                         "a chunk longer than a tensor is the whole tensor anyway)")
    if "selection" in h and h["selection"] not in SELECTIONS:
        raise ValueError(f"Invalid selection: {h['selection']!r} (expected one of {', '.join(SELECTIONS)})")
    if "state_dtype" in h and h["state_dtype"] not in _STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {h['state_dtype']!r} (expected torch.bfloat16 or torch.float32)")
    for flag in ("sparse", "stochastic_rounding"):
        if flag in h and not isinstance(h[flag], bool):
            raise TypeError(f"Invalid {flag}: {h[flag]!r} (expected True or False)")
    if "fused" in h and h["fused"] not in (None, True, False):
        raise TypeError(f"Invalid fused: {h['fused']!r} (expected None, True or False)")


def _distributed_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _StateView(NamedTuple):
    """Numbers of one parameter's sparse state, and the tensors (with their in-place versions)
    they were read from."""

    sources: tuple  # (tensor, tensor._version) of mask_density, mask_chunk_size, cohort_born
    layout: ChunkLayout
    density: float
    born: tuple[int, ...]  # interned: parameters with equal cohort tables share one tuple

    @staticmethod
    def sources_of(state: dict[str, Any]) -> tuple:
        return tuple((t, t._version) for t in (state["mask_density"], state["mask_chunk_size"], state["cohort_born"]))

    def reads(self, state: dict[str, Any]) -> bool:
        """Whether the state still holds the very tensors this was read from, unmodified (a load
        replaces them; torch.distributed.checkpoint may write into them in place)."""
        (density, d), (chunk_size, c), (born, b) = self.sources
        return (state["mask_density"] is density and state["mask_chunk_size"] is chunk_size
                and state["cohort_born"] is born and density._version == d and chunk_size._version == c
                and born._version == b)

    def changed(self, density: float, chunk_size: int) -> bool:
        return self.density != density or self.layout.chunk_size != chunk_size


class NanoAdam(CheckedOptimizer):
    r"""AdamW that updates, in every tensor, only the weights of smallest magnitude.

    Each sparse tensor is flattened and cut into chunks of ``chunk_size`` entries; every
    ``mask_interval`` steps the ``ceil(density * L)`` entries of each chunk (length ``L``) chosen
    by ``selection`` are selected, and only they get AdamW updates (weight decay included). Adam
    moments exist for the selected entries alone, in ``state_dtype``, next to their in-chunk
    positions (int16 for chunks of up to 4096 entries, int32 beyond: 6 bytes a kept entry at the
    defaults). Every other entry stays bitwise unchanged. Groups with ``sparse=False`` (classifier
    heads, normalization layers: see :func:`nanoadam.param_groups`) are trained with plain AdamW
    and float32 moments.

    Args:
        params: parameters or parameter groups; every argument below may be set per group.
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: term added to the denominator.
        weight_decay: decoupled weight decay, applied to selected entries only.
        density: fraction of each tensor that is updated, ``0 < density <= 1``.
        mask_interval: steps between mask refreshes; ``None`` keeps the mask chosen at the
            first step (static mask). A group whose ``density`` changed is refreshed at once.
        chunk_size: entries per chunk (at most ``2**27``); selection is per chunk, never global.
        selection: ``"small_weights"`` (the paper), ``"large_weights"``, ``"random"``,
            ``"large_gradients"`` (largest ``|grad|`` at the refresh step), or LIFT's
            ``"principal_weights"``: the largest entries of the rank-``principal_rank`` SVD
            approximation of each matrix, chosen over the whole tensor (one chunk per tensor, so
            int32 positions beyond 4096 entries); ``"principal_weights_smallest"`` keeps the
            smallest ones instead, as LIFT's released code does by default.
        state_dtype: dtype of the moments of sparse groups, ``torch.bfloat16`` (stored with
            stochastic rounding, so that they track float32 moments) or ``torch.float32``.
        sparse: ``False`` trains the group with plain AdamW.
        principal_rank: rank of the approximation the principal-weight selections score.
        stochastic_rounding: write updated bfloat16 weights with stochastic rounding, so that
            updates below half a bf16 step still move weights on average.
        fused: ``None`` uses the compiled CPU kernels or the Triton kernels where they apply,
            ``False`` the eager PyTorch reference everywhere, ``True`` requires a kernel for every
            sparse parameter (checked before anything changes).

    Step ``t`` (one counter per optimizer, kept in every param group as ``"step"``) refreshes the
    mask of a sparse tensor when it has none, when ``(t - 1) % mask_interval == 0`` or when its
    group's density or chunk size changed. Entries selected before and after a refresh keep their
    moments; a newly selected entry starts from zero moments and is bias-corrected for its own
    age, like a fresh ``torch.optim.Adam`` (per refresh cohort: :mod:`nanoadam.cohorts`). Ages
    count each parameter's own steps, as in ``torch.optim.AdamW``. Every random number (bf16
    rounding, ``selection="random"``) is a hash of the parameter's ordinal, the step and the
    entry's position (:mod:`nanoadam.rounding`): resume is bit-exact and ranks agree.

    Every check of a step (hyperparameters, gradients, state kinds and devices, ``fused=True``)
    runs for all groups before any mask, counter, moment or weight changes.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        density: float = 0.1,
        mask_interval: int | None = 100,
        chunk_size: int = 4096,
        selection: str = "small_weights",
        state_dtype: torch.dtype = torch.bfloat16,
        *,
        sparse: bool = True,
        stochastic_rounding: bool = False,
        fused: bool | None = None,
        principal_rank: int = 8,
    ) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, density=density, mask_interval=mask_interval,
            chunk_size=chunk_size, selection=selection, state_dtype=state_dtype, sparse=sparse,
            stochastic_rounding=stochastic_rounding, fused=fused, principal_rank=principal_rank,
        ))

    check_hyperparameters = staticmethod(_check_hyperparameters)

    # -- groups -------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self.param_groups[-1]["step"] = self._optimizer_step()
        if getattr(self, "_in_backward", None) is not None:
            self._in_backward["ordinals"] = self._ordinals()
            self._register_backward_hooks(self.param_groups[-1])

    def _optimizer_step(self) -> int:
        return max((g.get("step", 0) for g in self.param_groups), default=0)

    # -- step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if getattr(self, "_in_backward", None) is not None:
            raise RuntimeError("this NanoAdam updates parameters during backward() (step_in_backward was "
                               "called): do not call step(); call stop_step_in_backward() to go back")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._collect()  # every check, for every group, before anything changes
        t = self._optimizer_step() + 1
        for group in self.param_groups:
            group["step"] = t
        ordinals = self._ordinals()
        for group, params in work:
            if group["sparse"]:
                self._step_sparse(group, params, t, ordinals)
            else:
                self._step_dense(group, params, t, ordinals)
        return loss

    def _collect(self) -> list[tuple[dict[str, Any], list[torch.Tensor]]]:
        """Params with gradients per group, all checked before anything changes."""
        work = []
        for gi, group in enumerate(self.param_groups):
            _check_hyperparameters(group)
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                self._check_param(group, gi, p)
            if params:
                work.append((group, params))
        if not getattr(self, "_paths_checked", False):
            self._paths_checked = True
            self._warn_if_slow(work)
        return work

    def _check_param(self, group: dict[str, Any], gi: int, p: torch.Tensor) -> None:
        """Every reason this parameter's update could fail, raised before anything changes."""
        grad = p.grad

        def where() -> str:  # built only for a message: finding the position is a scan
            return f"param {next(i for i, q in enumerate(group['params']) if q is p)} of group {gi}"

        if grad.is_sparse:
            raise TypeError(f"NanoAdam does not support sparse gradients ({where()})")
        if grad.shape != p.shape:
            raise ValueError(f"grad of {where()} has shape {tuple(grad.shape)}, expected {tuple(p.shape)}")
        if not grad.is_floating_point():
            raise TypeError(f"grad of {where()} has dtype {grad.dtype}; NanoAdam needs floating-point gradients")
        if grad.device != p.device:
            raise ValueError(f"grad of {where()} is on {grad.device}, the parameter on {p.device}")
        if group["sparse"] and group["selection"] in WHOLE_TENSOR_SELECTIONS and _dt.is_dtensor(p):
            raise ValueError(f"selection={group['selection']!r} scores the whole tensor (an SVD), which a shard of "
                             f"{where()} cannot do; use a per-chunk selection under FSDP2")
        state = self.state.get(p)
        if state:
            if group["sparse"] and "exp_avg" in state and "index" not in state:
                raise ValueError(f"{where()} has dense state but is now in a sparse group; "
                                 "sparse=True must be set before training starts")
            if not group["sparse"] and "index" in state:
                raise ValueError(f"{where()} has sparse NanoAdam state but is now in a dense group; "
                                 "sparse=False must be set before training starts")
            device = _dt.local(p).device
            for key in ("index", "exp_avg", "exp_avg_sq"):
                if key in state and _dt.local(state[key]).device != device:
                    raise ValueError(f"the optimizer state of {where()} is on {_dt.local(state[key]).device}, the "
                                     f"parameter on {device}: move the model before building the optimizer, or "
                                     "reload the optimizer's state_dict after moving it")
        if group["sparse"] and group["fused"] and not fused_applies(_dt.local(p), _dt.local(grad), group):
            raise ValueError(f"fused=True, but {where()} cannot use a fused kernel (on CPU they need the compiled "
                             "kernels, contiguous float32 tensors, bf16 or float32 moments and a selection other "
                             "than 'random'; on CUDA, Triton with float32 or bf16 tensors); use fused=None")

    def _warn_if_slow(self, work: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        """One warning when the compiled CPU kernels are missing but would serve these tensors."""
        if _cpu.available() or _cpu.disabled_by_user():
            return
        for group, params in work:
            if group["sparse"] and group["fused"] is None and any(
                    _dt.local(p).device.type == "cpu" and p.dtype == torch.float32 for p in params):
                warnings.warn(f"NanoAdam: the compiled CPU kernels are not available ({_cpu.status()}); sparse "
                              "updates and mask refreshes run on the eager PyTorch path, whose refresh is about 14x "
                              "slower. nanoadam.show_config() says which paths are active.", RuntimeWarning,
                              stacklevel=4)
                return

    def _ordinals(self) -> dict[int, int]:
        """Each parameter's position among all of this optimizer's parameters: the seed of its
        random numbers (the same on every rank)."""
        return {id(q): i for i, q in enumerate(p for g in self.param_groups for p in g["params"])}

    def _step_dense(self, group: dict[str, Any], params: list[torch.Tensor], t: int, ordinals: dict[int, int]) -> None:
        states = [self._dense_state(p) for p in params]
        beta1, beta2 = group["betas"]
        param_salts = None
        if group["stochastic_rounding"]:
            param_salts = [salt(ordinals[id(p)], t, STREAM_PARAM) for p in params]
        dense_adamw(
            params, [p.grad for p in params], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [s["step"] for s in states], lr=group["lr"], beta1=beta1,
            beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], fused=group["fused"],
            param_salts=param_salts,
        )

    def _dense_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            # torch's fused CUDA AdamW wants the step on the device; everywhere else it stays on the host.
            host = p.device if p.device.type == "cuda" else torch.device("cpu")
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=host)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        return state

    def _step_sparse(self, group: dict[str, Any], params: list[torch.Tensor], t: int,
                     ordinals: dict[int, int]) -> None:
        betas, lr = group["betas"], group["lr"]
        density, chunk_size, interval = group["density"], group["chunk_size"], group["mask_interval"]
        state_dtype, selection, fused = group["state_dtype"], group["selection"], group["fused"]
        states = [self.state[p] for p in params]
        for state in states:
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["cohort_born"] = new_table()
        step_tensors = [s["step"] for s in states]
        torch._foreach_add_(step_tensors, 1.0)
        steps = [s.item() for s in step_tensors]
        # DTensor parameters (FSDP2): every rank works on its local shard.
        if any(_dt.is_dtensor(p) for p in params):
            shards = [_dt.local(p) for p in params]
            grads = [_dt.local(p.grad) for p in params]
            offsets = [_dt.global_offset(p) for p in params]
        else:
            shards, grads, offsets = params, [p.grad for p in params], [0] * len(params)
        seeds = [ordinals[id(p)] for p in params]
        refresh_step = interval is not None and (t - 1) % interval == 0
        views = [self._cached(p, state) if "index" in state else None for p, state in zip(params, states)]
        chunks = [tensor_chunk_size(selection, chunk_size, shard.numel()) for shard in shards]
        stale = [i for i, view in enumerate(views) if refresh_step or view is None or view.changed(density, chunks[i])]
        if stale:
            terms = []
            for i in stale:
                born = states[i]["cohort_born"].tolist()
                newborn, merge = admit(born, int(steps[i]), betas)
                states[i]["cohort_born"] = torch.tensor(born, dtype=torch.int64)
                terms.append(RefreshTerms(newborn, merge, salt(seeds[i], t, STREAM_MERGE),
                                          salt(seeds[i], t, STREAM_RANDOM), offsets[i]))
            fresh = refresh_masks(
                [shards[i] for i in stale], [grads[i] for i in stale], [self._mask(params[i]) for i in stale],
                [ChunkLayout.build(shards[i].numel(), chunks[i], density) for i in stale], terms,
                [implementation(shards[i], grads[i], state_dtype, selection, fused) for i in stale],
                selection=selection, state_dtype=state_dtype, principal_rank=group["principal_rank"],
            )
            for i, mask in zip(stale, fresh):
                self._store_mask(params[i], mask, density, chunks[i])
                views[i] = self._cached(params[i], states[i])
        masks, terms, impls = [], [], []
        tables: dict[tuple[int, float], tuple[float, ...]] = {}  # tensors of a group mostly share one
        for i, (p, cached) in enumerate(zip(params, views)):
            mask = self._mask(p, cached.layout)
            key = (id(cached.born), steps[i])
            if key not in tables:
                tables[key] = bias_table(cached.born, steps[i], lr, betas)
            masks.append(mask)
            terms.append(UpdateTerms(tables[key], seeds[i], t, group["stochastic_rounding"], offsets[i]))
            # The update follows the moments' dtype, which stays the old one until the next refresh.
            impls.append(implementation(shards[i], grads[i], mask.exp_avg.dtype, None, fused))
        sparse_adamw(shards, grads, masks, terms, impls, lr=lr, beta1=betas[0], beta2=betas[1], eps=group["eps"],
                     weight_decay=group["weight_decay"])

    def _cached(self, p: torch.Tensor, state: dict[str, Any]) -> _StateView:
        """Numbers read from a parameter's sparse state (layout, density, cohort births). Cached per
        parameter and keyed on the identity of the state tensors they come from, which every
        refresh and every load replaces: reading them as numbers each step costs more than the
        update of a small tensor."""
        if "cohort_born" not in state:  # state from before cohorts (loads upgrade at once; pickles here)
            self._upgrade_state(p)
        cache = self.__dict__.setdefault("_state_views", {})
        view = cache.get(id(p))
        if view is None or not view.reads(state):
            interned = self.__dict__.setdefault("_cohort_tables", {})
            if len(interned) > 4096:  # one entry per distinct table ever seen: keep it bounded
                interned.clear()
            born = tuple(state["cohort_born"].tolist())
            view = cache[id(p)] = _StateView(
                _StateView.sources_of(state),
                ChunkLayout.build(_dt.local(p).numel(), int(state["mask_chunk_size"]), float(state["mask_density"])),
                float(state["mask_density"]), interned.setdefault(born, born))
        return view

    def _mask(self, p: torch.Tensor, layout: ChunkLayout | None = None) -> Mask | None:
        state = self.state[p]
        if "index" not in state:
            return None
        layout = layout or self._cached(p, state).layout
        tensors = [state[k] for k in ("index", "exp_avg", "exp_avg_sq")]
        if _dt.is_dtensor(tensors[0]):
            tensors = [_dt.local_row(t, layout.kept) for t in tensors]
        return Mask(*tensors, layout)

    def _store_mask(self, p: torch.Tensor, mask: Mask, density: float, chunk_size: int) -> None:
        state = self.state[p]
        keys = ("index", "exp_avg", "exp_avg_sq")
        if _dt.is_dtensor(p):
            row = ChunkLayout.build(_dt.max_local_numel(p), chunk_size, density).kept
            in_place = "index" in state and state["index"].to_local().data_ptr() == mask.index.data_ptr() \
                and state["index"].to_local().shape[-1] == row
            if not in_place:
                for key, value in zip(keys, mask[:3]):
                    state[key] = _dt.state_dtensor(p, value, row)
        else:
            for key, value in zip(keys, mask[:3]):
                state[key] = value
        state["mask_density"] = torch.tensor(density, dtype=torch.float64)
        state["mask_chunk_size"] = torch.tensor(chunk_size, dtype=torch.int64)

    # -- step in backward ---------------------------------------------------------------------

    def step_in_backward(self, gradient_accumulation_steps: int = 1,
                         max_grad_norm_per_tensor: float | None = None) -> None:
        """Updates each parameter as soon as its gradient is ready and frees that gradient.

        A post-accumulate-grad hook on every parameter applies NanoAdam to it during
        ``loss.backward()`` and sets ``p.grad = None``, so the gradients of the whole model never
        exist at once (LOMO's idea, with Adam moments and NanoAdam's small state). Afterwards,
        ``backward()`` is the whole training step: do not call ``step()`` (it raises) or
        ``zero_grad()`` (nothing to zero). The update of each parameter is the one ``step()``
        would make, bit for bit (stochastic rounding included).

        Single-process training only: under DDP the hook runs before the gradient is all-reduced
        (ranks would update from their own gradients and drift apart), and FSDP2 sets sharded
        gradients after backward; both are refused with a ``RuntimeError``. There, call
        ``step()`` after ``backward()``.

        Args:
            gradient_accumulation_steps: update on every n-th backward pass; gradients of the
                passes in between accumulate in ``p.grad`` as usual (and are held until then).
            max_grad_norm_per_tensor: clip each parameter's gradient to this L2 norm before its
                update. Global clipping (``clip_grad_norm_`` over all parameters) cannot work
                here: no moment holds all gradients, and after ``backward()`` they are gone.

        Step hooks (``register_step_pre_hook``) do not run in this mode. Hooks do not survive
        pickling or ``state_dict``: call this again after building a new optimizer.
        """
        if isinstance(gradient_accumulation_steps, bool) or not isinstance(gradient_accumulation_steps, int) \
                or gradient_accumulation_steps < 1:
            raise ValueError(f"Invalid gradient_accumulation_steps: {gradient_accumulation_steps!r} "
                             "(expected an int >= 1)")
        if max_grad_norm_per_tensor is not None and not (is_number(max_grad_norm_per_tensor)
                                                         and max_grad_norm_per_tensor > 0):
            raise ValueError(f"Invalid max_grad_norm_per_tensor: {max_grad_norm_per_tensor!r} (expected > 0)")
        if getattr(self, "_in_backward", None) is not None:
            raise RuntimeError("step_in_backward is already on")
        self._refuse_distributed()
        self._in_backward = {"every": gradient_accumulation_steps, "clip": max_grad_norm_per_tensor,
                             "passes": 0, "pending": False, "handles": [], "ordinals": self._ordinals()}
        for group in self.param_groups:
            self._register_backward_hooks(group)

    def _refuse_distributed(self) -> None:
        sharded = any(_dt.is_dtensor(p) for g in self.param_groups for p in g["params"])
        if sharded or _distributed_world() > 1:
            raise RuntimeError(
                "step_in_backward works in single-process training only: its hooks run as each gradient is "
                "accumulated, before DDP all-reduces it (ranks would update from unreduced gradients and diverge) "
                "and before FSDP2 sets the sharded gradient. Call loss.backward() and then optimizer.step() instead.")

    def stop_step_in_backward(self) -> None:
        """Removes the hooks of :meth:`step_in_backward`; ``step()`` works again."""
        for handle in self._in_backward["handles"] if getattr(self, "_in_backward", None) else []:
            handle.remove()
        self._in_backward = None

    def _register_backward_hooks(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            if p.requires_grad:
                hook = functools.partial(self._backward_hook, group)
                self._in_backward["handles"].append(p.register_post_accumulate_grad_hook(hook))

    def _backward_hook(self, group: dict[str, Any], p: torch.Tensor) -> None:
        mode = self._in_backward
        if not mode["pending"]:  # first gradient of this backward pass
            self._refuse_distributed()  # the process group may have started after step_in_backward()
            mode["pending"] = True
            mode["passes"] += 1
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        if mode["passes"] % mode["every"]:
            return  # accumulating: the update comes with a later pass
        with torch.no_grad():
            _check_hyperparameters(group)
            self._check_param(group, next(i for i, g in enumerate(self.param_groups) if g is group), p)
            if mode["clip"] is not None:
                norm = torch.linalg.vector_norm(p.grad.float())
                p.grad.mul_(torch.clamp(mode["clip"] / (norm + 1e-6), max=1.0).to(p.grad.dtype))
            t = self._optimizer_step() + 1
            if group["sparse"]:
                self._step_sparse(group, [p], t, mode["ordinals"])
            else:
                self._step_dense(group, [p], t, mode["ordinals"])
        p.grad = None

    def _end_of_backward(self) -> None:
        mode = self._in_backward
        mode["pending"] = False
        if mode["passes"] % mode["every"] == 0:
            t = self._optimizer_step() + 1
            for group in self.param_groups:
                group["step"] = t

    # -- introspection ------------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes held in optimizer state: every tensor of every parameter's state (this rank's
        shard of DTensor state)."""
        return sum(
            _dt.local(v).numel() * v.element_size()
            for state in self.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor)
        )

    def masks(self) -> dict[torch.Tensor, torch.Tensor]:
        """Boolean mask of the currently selected entries of each sparse parameter (for analysis;
        allocates a full-size bool tensor per parameter; of the local shard for DTensors)."""
        from .selection import kept_mask

        out = {}
        for group in self.param_groups:
            for p in group["params"]:
                mask = self._mask(p) if group["sparse"] else None
                if mask is not None:
                    out[p] = kept_mask(mask.index, mask.layout).view(_dt.local(p).shape)
        return out

    # -- checkpoints --------------------------------------------------------------------------

    @staticmethod
    def _check_cohorts(state: dict[str, Any], index: torch.Tensor, layout: ChunkLayout, where: str) -> None:
        """A cohort table of 16 integer birth steps, each 0 (free) or within the parameter's own
        steps and distinct, and entries that name used slots only."""
        born = state["cohort_born"]
        if tuple(born.shape) != (COHORTS,) or born.dtype != torch.int64:
            raise ValueError(f"state_dict {where}: cohort_born must be {COHORTS} int64 birth steps, got shape "
                             f"{tuple(born.shape)} of {born.dtype}")
        steps = float(state["step"]) if "step" in state else 0.0
        used = [int(b) for b in born.tolist() if b != 0]
        if any(b < 1 or b > steps for b in used) or len(set(used)) != len(used):
            raise ValueError(f"state_dict {where}: cohort_born {born.tolist()} is not a table of distinct steps "
                             f"between 1 and the parameter's step count {steps:g}")
        if index.numel():
            named = torch.unique(cohort_ids(index, layout)).tolist()
            free = [c for c in named if int(born[c]) == 0]
            if free:
                raise ValueError(f"state_dict {where}: entries name cohorts {free}, which the table marks free")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints from before a key existed
            for key, value in _LATER_GROUP_KEYS.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict, keeping each state tensor's saved dtype (``torch.optim`` would cast
        bf16 moments and int16 positions to the parameter's dtype). Everything is checked before
        anything changes. State saved by earlier versions of NanoAdam loads too."""
        self._check_state_dict(state_dict)
        saved_states = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            if pid not in saved_states or p not in self.state:
                continue
            state = self.state[p]
            for key, saved in saved_states[pid].items():
                if not isinstance(saved, torch.Tensor):
                    continue
                if key in _HOST_KEYS and "index" in state:
                    state[key] = saved.detach().to("cpu", copy=True)
                elif state[key].dtype != saved.dtype:
                    state[key] = saved.detach().to(state[key].device, copy=True)
            self._upgrade_state(p)

    def _upgrade_state(self, p: torch.Tensor) -> None:
        """Sparse state of a checkpoint from before cohorts (no ``cohort_born``): its moments were
        kept on the scale of the parameter's own step count, which is one cohort born at step 1;
        its positions carry no cohort bits, and chunks of 4097 to 32768 entries used int16."""
        state = self.state.get(p)
        if not state or "index" not in state or "cohort_born" in state:
            return
        chunk_size = int(state["mask_chunk_size"])
        index = state["index"]
        if index.dtype == torch.int16 and chunk_size > INT16_CHUNK_LIMIT:
            as_int32 = _dt.local(index).to(torch.int32) & 0xFFFF  # positions up to 32767: never negative
            state["index"] = _dt.replace_local(index, as_int32)
        born = new_table()
        born[0] = 1
        state["cohort_born"] = born

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (from NanoAdam.state_dict())")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer has {len(self.param_groups)}")
        for gi, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(f"param group {gi} of state_dict has {len(saved['params'])} params, "
                                 f"this optimizer's has {len(mine['params'])}")
            _check_hyperparameters({k: v for k, v in saved.items() if k != "params"})
            for pi, (pid, p) in enumerate(zip(saved["params"], mine["params"])):
                state = state_dict["state"].get(pid)
                if state:
                    self._check_param_state(state, p, saved.get("sparse", True), f"param {pi} of group {gi}")

    @staticmethod
    def _check_param_state(state: dict[str, Any], p: torch.Tensor, sparse: bool, where: str) -> None:
        if not sparse:
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and tuple(state[key].shape) != tuple(p.shape):
                    raise ValueError(f"state_dict {where}: {key} has shape {tuple(state[key].shape)}, "
                                     f"the parameter has shape {tuple(p.shape)}")
            return
        if "index" not in state:
            return
        required = ("exp_avg", "exp_avg_sq", "mask_density", "mask_chunk_size")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"state_dict {where}: sparse state lacks {', '.join(missing)}")
        chunk_size = int(state["mask_chunk_size"])
        density = float(state["mask_density"])
        if _dt.is_dtensor(p):  # rows of (shards, K_max), see nanoadam._dtensor
            expected = (ChunkLayout.build(_dt.max_local_numel(p), chunk_size, density).kept,)
            shapes = {key: tuple(_dt.local(state[key]).shape[-1:]) for key in ("index", "exp_avg", "exp_avg_sq")}
        else:
            expected = (ChunkLayout.build(p.numel(), chunk_size, density).kept,)
            shapes = {key: (state[key].numel(),) for key in ("index", "exp_avg", "exp_avg_sq")}
        for key, shape in shapes.items():
            if shape != expected:
                raise ValueError(f"state_dict {where}: {key} holds {shape[0]} entries, a parameter of "
                                 f"{p.numel()} entries at this density keeps {expected[0]} (state for other params?)")
        index = _dt.local(state["index"])
        has_cohorts = "cohort_born" in state
        if has_cohorts:
            layout = ChunkLayout.build(1, chunk_size, density)
            NanoAdam._check_cohorts(state, index, layout, where)
            int16_limit = INT16_CHUNK_LIMIT
            at = positions(index, layout)
        else:  # saved before cohorts: plain positions
            int16_limit = _OLD_INT16_CHUNK_LIMIT
            at = index.long()
        if index.numel() and (int(at.min()) < 0 or int(at.max()) >= min(chunk_size, _dt.local(p).numel())
                              or (chunk_size <= int16_limit) != (index.dtype == torch.int16)):
            raise ValueError(f"state_dict {where}: index values or dtype do not fit chunk_size={chunk_size}")
