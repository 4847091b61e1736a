"""One registry from a name to a ready optimizer: NanoAdam, its ablations and the paper's baselines.

Experiments ask ``build_optimizer(name, model, lr=..., total_steps=...)`` and get an
:class:`OptimizerBundle`: the optimizer plus the schedulers that belong to the method (NanoAdam's
density decay), stepped after every optimizer step. No experiment special-cases an optimizer.

Parameter grouping follows the paper. ``nanoadam``: the classifier head and normalization layers
dense (plain AdamW), everything else sparse (:func:`nanoadam.param_groups`). ``galore``: the
low-rank projection on the 2-D weights of ``nn.Linear`` layers of the body (attention and
feed-forward, as in the GaLore paper), plain Adam for embeddings, biases, norms and the head.
``adamw``/``adamw8bit``: every parameter alike (bitsandbytes keeps tensors under 4096 entries in
32 bits). ``microadam``: every parameter alike, as the official optimizer does.

Defaults (DESIGN.md, paper Appendix H.1): MicroAdam window m = 10, density k = 1 %, quantization
bucket 64. GaLore rank 8, SVD every 200 steps, scale 1 (the paper fixes the scale to 1; our
quick GLUE budgets run a few hundred steps, so the projection is refreshed a few times per run).
NanoAdam density 0.1, mask interval 100, chunks of 4096, bf16 moments. Every value can be
overridden by keyword.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nanoadam.grouping import DEFAULT_HEAD_NAMES, dense_parameter_names, head_parameter_names, param_groups
from nanoadam.optimizer import NanoAdam
from nanoadam.schedule import DensityScheduler


class MissingExtraError(ImportError):
    """An optional library a registry entry needs is not installed."""


@dataclass
class OptimizerBundle:
    """An optimizer and the schedulers of its method, to step after each ``optimizer.step()``."""

    optimizer: torch.optim.Optimizer
    schedulers: list[Any] = field(default_factory=list)
    name: str = ""
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def step(self) -> None:
        self.optimizer.step()
        for scheduler in self.schedulers:
            scheduler.step()


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    description: str
    defaults: dict[str, Any]
    build: Callable[..., OptimizerBundle]


def _require(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"this optimizer needs the package {module.split('.')[0]!r}: pip install 'nanoadam[{extra}]'"
        ) from e


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _torch_adamw(params_or_groups: list, fused: bool | None, **hyper) -> torch.optim.AdamW:
    """``torch.optim.AdamW``, with the fused kernel where every parameter allows it (``fused=None``)."""
    params = [p for g in params_or_groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params_or_groups, fused=fused or None, **hyper)


def _adamw(model, lr, total_steps, *, betas, eps, weight_decay, fused):
    return OptimizerBundle(_torch_adamw(_trainable(model), fused, lr=lr, betas=betas, eps=eps,
                                        weight_decay=weight_decay))


def _head_only(model, lr, total_steps, *, betas, eps, weight_decay):
    # The control that says what a new head alone can learn: the backbone is frozen (requires_grad
    # off, so backward stops at the head) and AdamW trains the head.
    heads = head_parameter_names(model)
    for name, p in model.named_parameters():
        if name not in heads:
            p.requires_grad_(False)
    params = _trainable(model)
    if not params:
        raise ValueError("head-only found no head parameters in this model")
    return OptimizerBundle(torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))


def _adamw_headlr(model, lr, total_steps, *, betas, eps, weight_decay, head_lr, fused):
    # The control that separates a fast-learning head from the backbone optimizer: AdamW at ``lr``
    # for the body, the head at ``head_lr`` (NanoAdam's rate, in the comparisons).
    if head_lr is None:
        raise ValueError("adamw-headlr needs head_lr (the head group's learning rate)")
    heads = head_parameter_names(model)
    body = [p for n, p in model.named_parameters() if p.requires_grad and n not in heads]
    head = [p for n, p in model.named_parameters() if p.requires_grad and n in heads]
    groups = [g for g in ({"params": body}, {"params": head, "lr": head_lr}) if g["params"]]
    return OptimizerBundle(_torch_adamw(groups, fused, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))


def _adamw8bit(model, lr, total_steps, *, betas, eps, weight_decay, min_8bit_size):
    bnb = _require("bitsandbytes", "baselines")
    opt = bnb.optim.AdamW8bit(_trainable(model), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                              min_8bit_size=min_8bit_size)
    return OptimizerBundle(opt)


def galore_target_names(model: nn.Module, head_names=DEFAULT_HEAD_NAMES) -> set[str]:
    """Qualified names of the weights GaLore projects: 2-D weights of body ``nn.Linear`` layers."""
    dense = dense_parameter_names(model, head_names)
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.weight.requires_grad and f"{name}.weight" not in dense
    }


def _galore(model, lr, total_steps, *, betas, eps, weight_decay, rank, update_proj_gap, scale, proj_type,
            proj_refreshes):
    galore_torch = _require("galore_torch", "baselines")
    if proj_refreshes is not None:  # the projection's SVD a fixed number of times a run
        if total_steps is None:
            raise ValueError("proj_refreshes needs total_steps")
        update_proj_gap = max(1, -(-total_steps // proj_refreshes))
    targets = galore_target_names(model)
    projected = [p for n, p in model.named_parameters() if n in targets and p.requires_grad]
    projected_ids = {id(p) for p in projected}
    regular = [p for p in _trainable(model) if id(p) not in projected_ids]
    groups = []
    if regular:
        groups.append({"params": regular})
    if projected:
        groups.append({"params": projected, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
                       "proj_type": proj_type})
    opt = galore_torch.GaLoreAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                   no_deprecation_warning=True)
    return OptimizerBundle(opt, hyperparameters={"update_proj_gap": update_proj_gap})


def _microadam(model, lr, total_steps, *, betas, eps, weight_decay, m, density, block_size, quant_bucket,
               official):
    params = _trainable(model)
    on_cuda = all(p.device.type == "cuda" for p in params)
    if official is not False and on_cuda:
        try:
            official_module = importlib.import_module("ista_daslab_optimizers")
        except ImportError:
            if official:
                raise MissingExtraError("official=True needs ista_daslab_optimizers (pip install "
                                        "ista-daslab-optimizers, CUDA only)") from None
        else:
            opt = official_module.MicroAdam(params, m=m, lr=lr, quant_block_size=quant_bucket, k_init=density,
                                            betas=betas, weight_decay=weight_decay, eps=eps)
            return OptimizerBundle(opt, hyperparameters={"implementation": "ista_daslab_optimizers"})
    elif official:
        raise MissingExtraError("official=True needs CUDA parameters and ista_daslab_optimizers")
    from .microadam import MicroAdam

    opt = MicroAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, m=m, density=density,
                    block_size=block_size, quant_bucket=quant_bucket)
    return OptimizerBundle(opt, hyperparameters={"implementation": "nanoadam_lab.baselines.microadam (port)"})


def _nanoadam(model, lr, total_steps, *, betas, eps, weight_decay, density, mask_interval, chunk_size, selection,
              state_dtype, final_density, density_interval, fused, principal_rank, stochastic_rounding, sparse_head):
    # sparse_head: the head (a decoder's lm_head, and the embedding tied to it) sparse too, norms
    # still dense; the paper trains the head densely (float32 AdamW state for the whole vocabulary).
    groups = param_groups(model, head_names=() if sparse_head else None)
    if stochastic_rounding is None:  # bf16 weights: write updates back unbiased (below half a bf16 step too)
        stochastic_rounding = any(p.dtype == torch.bfloat16 for g in groups for p in g["params"])
    opt = NanoAdam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, density=density,
                   mask_interval=mask_interval, chunk_size=chunk_size, selection=selection, state_dtype=state_dtype,
                   fused=fused, principal_rank=principal_rank, stochastic_rounding=stochastic_rounding)
    schedulers = []
    if final_density is not None:
        if total_steps is None:
            raise ValueError("final_density needs total_steps (the density decays linearly over the run)")
        schedulers.append(DensityScheduler(opt, final_density=final_density, total_steps=total_steps,
                                           interval=density_interval))
    return OptimizerBundle(opt, schedulers, hyperparameters={"stochastic_rounding": stochastic_rounding})


_ADAM = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
_NANO = dict(_ADAM, density=0.1, mask_interval=100, chunk_size=4096, selection="small_weights",
             state_dtype=torch.bfloat16, final_density=None, density_interval=None, fused=None, principal_rank=8,
             stochastic_rounding=None, sparse_head=False)

REGISTRY: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in [
        OptimizerSpec("adamw", "torch.optim.AdamW (fused kernel where available)", dict(_ADAM, fused=None), _adamw),
        OptimizerSpec("adamw8bit", "bitsandbytes.optim.AdamW8bit, block-wise 8-bit moments",
                      dict(_ADAM, min_8bit_size=4096), _adamw8bit),
        OptimizerSpec("galore", "galore_torch.GaLoreAdamW, rank-8 projection of body Linear weights",
                      dict(_ADAM, rank=8, update_proj_gap=200, scale=1.0, proj_type="std", proj_refreshes=None),
                      _galore),
        OptimizerSpec("microadam", "MicroAdam: top-1 % gradients, 4-bit error feedback, window of 10",
                      dict(_ADAM, m=10, density=0.01, block_size=4096, quant_bucket=64, official=None),
                      _microadam),
        OptimizerSpec("nanoadam", "NanoAdam: smallest 10 % of each tensor, dynamic mask", dict(_NANO), _nanoadam),
        OptimizerSpec("nanoadam-static", "NanoAdam with a static mask (ablation)",
                      dict(_NANO, mask_interval=None), _nanoadam),
        # LIFT sizes its mask like a rank-128 LoRA (about 5 % of a 7B model); here the density is
        # NanoAdam's, so both update the same fraction. Rank 8 is hidden/48 on MiniLM, inside
        # the hidden/32 to hidden/256 of LIFT's configs.
        OptimizerSpec("lift", "LIFT: Adam on the principal weights (largest of a rank-8 approximation), 10 %",
                      dict(_NANO, selection="principal_weights"), _nanoadam),
        OptimizerSpec("head-only", "control: backbone frozen, AdamW on the new head (a linear probe)",
                      dict(_ADAM), _head_only),
        OptimizerSpec("adamw-headlr", "control: AdamW with the head at its own rate (head_lr, NanoAdam's)",
                      dict(_ADAM, head_lr=None, fused=None), _adamw_headlr),
    ]
}


# Controls of the comparisons (they answer what a frozen backbone or a fast head alone achieves),
# not optimizers anyone would bench for speed or memory.
CONTROLS = ("head-only", "adamw-headlr")


def available_optimizers(controls: bool = True) -> list[str]:
    return [name for name in REGISTRY if controls or name not in CONTROLS]


def build_optimizer(name: str, model: nn.Module, lr: float, total_steps: int | None = None,
                    **overrides: Any) -> OptimizerBundle:
    """The optimizer ``name`` for ``model``'s trainable parameters, with the paper's defaults and
    ``overrides`` on top. Raises ValueError for an unknown name or hyperparameter and
    :class:`MissingExtraError` (an ImportError) naming the extra to install."""
    if name not in REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(REGISTRY)}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"Invalid lr: {lr!r} (expected a number > 0)")
    spec = REGISTRY[name]
    unknown = set(overrides) - set(spec.defaults)
    if unknown:
        raise ValueError(f"{name} has no hyperparameter {', '.join(sorted(unknown))}; "
                         f"it takes {', '.join(sorted(spec.defaults))}")
    hyper = {**spec.defaults, **overrides}
    bundle = spec.build(model, lr, total_steps, **hyper)
    bundle.name = name
    bundle.hyperparameters = {"lr": lr, **{k: _jsonable(v) for k, v in hyper.items()}, **bundle.hyperparameters}
    return bundle


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return list(value)
    return value


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor an optimizer keeps in its state, found by walking dicts, lists and
    objects (GaLore keeps its projection matrices inside projector objects); each storage once."""
    seen: set[int] = set()
    total = 0

    def walk(obj, depth=0):
        nonlocal total
        if depth > 6:
            return
        if isinstance(obj, torch.Tensor):
            key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
            if key not in seen:
                seen.add(key)
                total += obj.untyped_storage().nbytes() if obj.numel() else 0
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
            for v in vars(obj).values():
                walk(v, depth + 1)

    for state in optimizer.state.values():
        walk(state)
    return total
