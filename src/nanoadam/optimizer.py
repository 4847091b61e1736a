"""``NanoAdam``: AdamW on the smallest weights of each tensor, with moments for those alone.

The class validates hyperparameters, groups parameters and keeps state; the math is in
``nanoadam.functional``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from . import _dtensor as _dt
from ._validation import check_adam_hyperparameters, check_positive_int, is_number
from .functional import Mask, dense_adamw, fused_applies, refresh_masks, sparse_adamw
from .selection import INT16_CHUNK_LIMIT, SELECTIONS, ChunkLayout

_STATE_DTYPES = (torch.bfloat16, torch.float32)
# Per-parameter bookkeeping of sparse tensors, read with .item() every step: kept on the host.
_HOST_KEYS = ("step", "mask_density", "mask_chunk_size")


def _check_hyperparameters(h: dict[str, Any]) -> None:
    """Raises ValueError/TypeError naming the first bad hyperparameter in ``h``."""
    check_adam_hyperparameters(h)
    if "mask_interval" in h and h["mask_interval"] is not None:
        check_positive_int(h, "mask_interval", "an int >= 1, or None for a static mask")
    check_positive_int(h, "chunk_size")
    if "selection" in h and h["selection"] not in SELECTIONS:
        raise ValueError(f"Invalid selection: {h['selection']!r} (expected one of {', '.join(SELECTIONS)})")
    if "state_dtype" in h and h["state_dtype"] not in _STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {h['state_dtype']!r} (expected torch.bfloat16 or torch.float32)")
    for flag in ("sparse", "stochastic_rounding"):
        if flag in h and not isinstance(h[flag], bool):
            raise TypeError(f"Invalid {flag}: {h[flag]!r} (expected True or False)")
    if "fused" in h and h["fused"] not in (None, True, False):
        raise TypeError(f"Invalid fused: {h['fused']!r} (expected None, True or False)")


class NanoAdam(Optimizer):
    r"""AdamW that updates, in every tensor, only the weights of smallest magnitude.

    Each sparse tensor is flattened and cut into chunks of ``chunk_size`` entries; every
    ``mask_interval`` steps the ``ceil(density * L)`` entries of each chunk (length ``L``) chosen
    by ``selection`` are selected, and only they get AdamW updates (weight decay included). Adam
    moments exist for the selected entries alone, in ``state_dtype``, next to their in-chunk
    positions (int16; int32 when ``chunk_size`` exceeds 32768). Every other entry stays bitwise
    unchanged. Groups with ``sparse=False`` (classifier heads, normalization layers: see
    :func:`nanoadam.param_groups`) are trained with plain AdamW and float32 moments.

    Args:
        params: parameters or parameter groups; every argument below may be set per group.
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: term added to the denominator.
        weight_decay: decoupled weight decay, applied to selected entries only.
        density: fraction of each tensor that is updated, ``0 < density <= 1``.
        mask_interval: steps between mask refreshes; ``None`` keeps the mask chosen at the
            first step (static mask). A group whose ``density`` changed is refreshed at once.
        chunk_size: entries per chunk; selection is per chunk, never global.
        selection: ``"small_weights"`` (the paper), ``"large_weights"``, ``"random"`` or
            ``"large_gradients"`` (largest ``|grad|`` at the refresh step).
        state_dtype: dtype of the moments of sparse groups, ``torch.bfloat16`` or ``torch.float32``.
        sparse: ``False`` trains the group with plain AdamW.
        stochastic_rounding: write updated bfloat16 weights with stochastic rounding (sparse
            groups), so that updates below half a bf16 step still move weights on average.
        fused: ``None`` uses the compiled CPU kernels where they apply, ``False`` the eager
            PyTorch reference everywhere, ``True`` requires the kernels.

    Step ``t`` (one counter per optimizer, kept in every param group as ``"step"``) refreshes the
    mask of a sparse tensor when it has none, when ``(t - 1) % mask_interval == 0`` or when its
    group's density or chunk size changed. Entries selected before and after a refresh keep their
    moments; how new entries are bias-corrected is described in :mod:`nanoadam.functional`. Bias
    correction counts each parameter's own steps, as in ``torch.optim.AdamW``.
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
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
            weight_decay=weight_decay, density=density, mask_interval=mask_interval,
            chunk_size=chunk_size, selection=selection, state_dtype=state_dtype, sparse=sparse,
            stochastic_rounding=stochastic_rounding, fused=fused,
        )
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)

    # -- groups -------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the "
                            "ordering of tensors in sets will change between runs; use a list instead")
        params = [params] if isinstance(params, torch.Tensor) else list(params or [])
        param_group = {**param_group, "params": params}
        candidate = {**self.defaults, **param_group}
        _check_hyperparameters(candidate)
        for p in params:
            if isinstance(p, torch.Tensor) and p.is_complex():
                raise TypeError("NanoAdam does not support complex parameters (params of dtype "
                                f"{p.dtype}); view them as real with torch.view_as_real")
            if isinstance(p, torch.Tensor) and not p.is_floating_point():
                raise TypeError(f"NanoAdam needs floating-point params, got one of dtype {p.dtype}")
        super().add_param_group(param_group)
        self.param_groups[-1]["step"] = self._optimizer_step()
        if getattr(self, "_in_backward", None) is not None:
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
        work = self._collect()
        t = self._optimizer_step() + 1
        for group in self.param_groups:
            group["step"] = t
        for group, params in work:
            if group["sparse"]:
                self._step_sparse(group, params, t)
            else:
                self._step_dense(group, params)
        return loss

    def _collect(self) -> list[tuple[dict[str, Any], list[torch.Tensor]]]:
        """Params with gradients per group, all checked before anything changes."""
        work = []
        for gi, group in enumerate(self.param_groups):
            _check_hyperparameters(group)
            params = []
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"NanoAdam does not support sparse gradients (param {pi} of group {gi})")
                if p.grad.shape != p.shape:
                    raise ValueError(f"grad of param {pi} in group {gi} has shape {tuple(p.grad.shape)}, "
                                     f"expected {tuple(p.shape)}")
                if group["fused"] and group["sparse"] and not fused_applies(p, p.grad, group):
                    raise ValueError(f"fused=True, but param {pi} of group {gi} cannot use a fused kernel (on CPU "
                                     "they need the compiled kernels, contiguous float32 tensors, bf16 or float32 "
                                     "moments and a selection other than 'random'; on CUDA, Triton); use fused=None")
                params.append(p)
            if params:
                work.append((group, params))
        return work

    def _step_dense(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        states = [self._dense_state(p) for p in params]
        beta1, beta2 = group["betas"]
        dense_adamw(
            params, [p.grad for p in params], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [s["step"] for s in states], lr=group["lr"], beta1=beta1,
            beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], fused=group["fused"],
            rounding_seeds=self._rounding_seeds(group, params),
        )

    def _rounding_seeds(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[int] | None:
        """Per-parameter seeds of stochastic rounding at this step (reproducible, resumable)."""
        if not group["stochastic_rounding"]:
            return None
        ordinal = {id(q): i for i, q in enumerate(p for g in self.param_groups for p in g["params"])}
        t = self._optimizer_step()
        return [(t * 1_000_003 + ordinal[id(p)]) ^ 0x5EED for p in params]

    def _dense_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if "index" in state:
            raise ValueError("a parameter with sparse NanoAdam state is now in a dense group; "
                             "sparse=False must be set before training starts")
        if not state:
            # torch's fused CUDA AdamW wants the step on the device; everywhere else it stays on the host.
            host = p.device if p.device.type == "cuda" else torch.device("cpu")
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=host)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        return state

    def _step_sparse(self, group: dict[str, Any], params: list[torch.Tensor], t: int) -> None:
        beta1, beta2 = group["betas"]
        density, chunk_size, interval = group["density"], group["chunk_size"], group["mask_interval"]
        states = [self.state[p] for p in params]
        for state in states:
            if "exp_avg" in state and "index" not in state:
                raise ValueError("a parameter with dense state is now in a sparse group; "
                                 "sparse=True must be set before training starts")
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
        step_tensors = [s["step"] for s in states]
        torch._foreach_add_(step_tensors, 1.0)
        steps = [s.item() for s in step_tensors]
        # DTensor parameters (FSDP2): every rank works on its local shard.
        shards = [_dt.local(p) for p in params]
        grads = [_dt.local(p.grad) for p in params]
        stale = []
        for i, state in enumerate(states):
            if (
                "index" not in state
                or (interval is not None and (t - 1) % interval == 0)
                or state["mask_density"].item() != density
                or state["mask_chunk_size"].item() != chunk_size
            ):
                stale.append(i)
        if stale:
            ordinal = {id(q): i for i, q in enumerate(p for g in self.param_groups for p in g["params"])}
            fresh = refresh_masks(
                [shards[i] for i in stale], [grads[i] for i in stale], [self._mask(params[i]) for i in stale],
                [ChunkLayout.build(shards[i].numel(), chunk_size, density) for i in stale],
                selection=group["selection"], state_dtype=group["state_dtype"],
                seeds=[t * 1_000_003 + ordinal[id(params[i])] for i in stale], fused=group["fused"],
            )
            for i, mask in zip(stale, fresh):
                self._store_mask(params[i], mask, density, chunk_size)
        sparse_adamw(
            shards, grads, [self._mask(p) for p in params], steps, lr=group["lr"],
            beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            fused=group["fused"], rounding_seeds=self._rounding_seeds(group, params),
        )

    def _mask(self, p: torch.Tensor) -> Mask | None:
        state = self.state[p]
        if "index" not in state:
            return None
        layout = ChunkLayout.build(_dt.local(p).numel(), int(state["mask_chunk_size"]), float(state["mask_density"]))
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
        would make, bit for bit.

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
        self._in_backward = {"every": gradient_accumulation_steps, "clip": max_grad_norm_per_tensor,
                             "passes": 0, "pending": False, "handles": []}
        for group in self.param_groups:
            self._register_backward_hooks(group)

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
            mode["pending"] = True
            mode["passes"] += 1
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        if mode["passes"] % mode["every"]:
            return  # accumulating: the update comes with a later pass
        with torch.no_grad():
            if p.grad.is_sparse:
                raise TypeError("NanoAdam does not support sparse gradients")
            if mode["clip"] is not None:
                norm = torch.linalg.vector_norm(p.grad.float())
                p.grad.mul_(torch.clamp(mode["clip"] / (norm + 1e-6), max=1.0).to(p.grad.dtype))
            t = self._optimizer_step() + 1
            if group["sparse"]:
                self._step_sparse(group, [p], t)
            else:
                self._step_dense(group, [p])
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict, keeping each state tensor's saved dtype (``torch.optim`` would cast
        bf16 moments to the parameter's dtype). Everything is checked before anything changes."""
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
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= min(chunk_size, _dt.local(p).numel())
                              or (chunk_size <= INT16_CHUNK_LIMIT) != (index.dtype == torch.int16)):
            raise ValueError(f"state_dict {where}: index values or dtype do not fit chunk_size={chunk_size}")
