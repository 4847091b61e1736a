"""``param_groups(model)``: which tensors NanoAdam updates sparsely and which stay dense.

The paper trains the classifier head (newly initialized, task specific) and the normalization
layers densely and everything else sparsely. Heads are found by module name: a module with a
name component in ``head_names`` that is not inside a numbered block (so the ``fc`` of a ResNet
and peft's ``classifier.modules_to_save.default`` are heads, a transformer's ``mlp.fc`` inside
``layers.3`` is not). A parameter
shared between a head and another module (tied embeddings) is dense. Normalization layers are
found by type (``LayerNorm``, ``GroupNorm``, ``BatchNorm*``, ``InstanceNorm*``, ``RMSNorm``) or by
a class name containing ``Norm`` (``LlamaRMSNorm``, ``T5LayerNorm``, ...).

A model with no module named like a head (a plain ``nn.Sequential`` classifier, say) would
otherwise have its output layer trained sparsely, which nobody wants for a new, randomly
initialized layer: by default the last module that owns parameters, unless it is a
normalization layer, is then taken for the output layer and kept dense, with a warning that
names it. Passing ``head_names`` explicitly turns that guess off (``head_names=()``: no head).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ._validation import is_number

DEFAULT_HEAD_NAMES = ("classifier", "lm_head", "head", "heads", "fc", "score", "cls", "qa_outputs")

_NORM_TYPES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES += (nn.RMSNorm,)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def is_head(name: str, head_names: Iterable[str]) -> bool:
    """A module named like a head (any name component, so that ``classifier.dense`` and peft's
    ``classifier.modules_to_save.default`` count) outside numbered blocks."""
    parts = name.split(".")
    return bool(name) and any(p in head_names for p in parts) and not any(p.isdigit() for p in parts)


def _head_parameter_ids(model: nn.Module, head_names: tuple[str, ...]) -> set[int]:
    return {id(p) for name, module in model.named_modules(remove_duplicate=False) if is_head(name, head_names)
            for p in module.parameters()}


def output_layer(model: nn.Module) -> str | None:
    """Name of the last module (in registration order) that owns parameters, unless it is a
    normalization layer or the model itself: the output layer of a model without a named head."""
    last = None
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = (name, module)
    if last is None or not last[0] or is_norm(last[1]):
        return None
    return last[0]


def head_parameter_names(model: nn.Module, head_names: Iterable[str] | None = None) -> set[str]:
    """Qualified names of the head's parameters (every alias of a tied one). ``head_names=None``:
    the default names, and the output layer when none of them matches (with a warning)."""
    guess = head_names is None
    head_names = DEFAULT_HEAD_NAMES if head_names is None else tuple(head_names)
    head_ids = _head_parameter_ids(model, head_names)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if guess and not head_ids & trainable and (layer := output_layer(model)) is not None:
        module = model.get_submodule(layer)
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            warnings.warn(f"param_groups: no module is named like a classifier head ({', '.join(DEFAULT_HEAD_NAMES)}), "
                          f"so the last layer with parameters, {layer!r} ({type(module).__name__}), is taken for the "
                          "output layer and trained densely; pass head_names=(...) to name the head, or "
                          "head_names=() to train every layer but the norms sparsely", UserWarning, stacklevel=3)
            head_ids.update(id(p) for p in module.parameters(recurse=False))
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in head_ids}


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Qualified names of the parameters of normalization layers."""
    norm_ids = {id(p) for module in model.modules() if is_norm(module) for p in module.parameters(recurse=False)}
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in norm_ids}


def dense_parameter_names(model: nn.Module, head_names: Iterable[str] | None = None) -> set[str]:
    """Qualified names of the parameters ``param_groups`` keeps dense: the head's and the norms'."""
    return head_parameter_names(model, head_names) | norm_parameter_names(model)


def param_groups(
    model: nn.Module,
    *,
    head_names: Iterable[str] | None = None,
    is_dense: Callable[[str, torch.Tensor], bool] | None = None,
    head_lr: float | None = None,
    **sparse_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for :class:`nanoadam.NanoAdam`: ``{"params": ..., "sparse": True, **sparse_options}``
    for the body and ``{"params": ..., "sparse": False}`` for heads and normalization layers.

    Only parameters with ``requires_grad`` are included, each once. ``head_names`` (default
    ``DEFAULT_HEAD_NAMES``, plus the output layer of a model in which none matches) names the
    head modules. ``is_dense(name, param)`` marks further parameters dense (e.g.
    ``lambda n, p: p.ndim == 1`` for all biases). ``head_lr`` puts the head in a dense group of its
    own with that learning rate (the body and the norms keep the optimizer's); a fast-learning
    head can otherwise be most of what a higher rate buys. Empty groups are left out.
    """
    if head_lr is not None and not (is_number(head_lr) and head_lr > 0):
        raise ValueError(f"Invalid head_lr: {head_lr!r} (expected a number > 0, or None)")
    heads = head_parameter_names(model, head_names)
    norms = norm_parameter_names(model)
    sparse, dense, head = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in heads and head_lr is not None:
            head.append(p)
        elif name in heads or name in norms or (is_dense is not None and is_dense(name, p)):
            dense.append(p)
        else:
            sparse.append(p)
    groups = []
    if sparse:
        groups.append({"params": sparse, "sparse": True, **sparse_options})
    if dense:
        groups.append({"params": dense, "sparse": False})
    if head:
        groups.append({"params": head, "sparse": False, "lr": head_lr})
    return groups
