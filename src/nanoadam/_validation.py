"""Hyperparameter checks shared by NanoAdam and the MicroAdam port: each names the argument."""

from __future__ import annotations

import math
from typing import Any

import torch


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_adam_hyperparameters(h: dict[str, Any]) -> None:
    """``lr``, ``eps``, ``weight_decay`` (finite, >= 0), ``betas`` (a pair in [0, 1)) and ``density``
    (in (0, 1]), where present in ``h``; ValueError/TypeError naming the first bad one."""
    for name in ("lr", "eps", "weight_decay"):
        if name in h:
            value = h[name]
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if not is_number(value):
                raise TypeError(f"Invalid {name}: {h[name]!r} (expected a number)")
            if not value >= 0 or math.isinf(value):
                raise ValueError(f"Invalid {name}: {value} (expected a finite value >= 0)")
    if "betas" in h:
        betas = h["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(is_number(b) for b in betas):
            raise TypeError(f"Invalid betas: {betas!r} (expected a pair of numbers)")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid betas: beta parameter at index {i} is {b} (expected 0 <= beta < 1)")
    if "density" in h:
        d = h["density"]
        if not is_number(d):
            raise TypeError(f"Invalid density: {d!r} (expected a number in (0, 1])")
        if not 0.0 < d <= 1.0:
            raise ValueError(f"Invalid density: {d} (expected 0 < density <= 1)")


def check_positive_int(h: dict[str, Any], name: str, what: str = "an int >= 1") -> None:
    if name in h:
        value = h[name]
        if not is_int(value):
            raise TypeError(f"Invalid {name}: {value!r} (expected {what})")
        if value < 1:
            raise ValueError(f"Invalid {name}: {value} (expected {what})")


def checked_param_group(param_group: Any, optimizer: str) -> dict[str, Any]:
    """``param_group`` with ``params`` as a list, after the checks torch.optim makes (a dict, an
    ordered collection) and ours (real floating-point tensors); TypeError names what is wrong."""
    if not isinstance(param_group, dict):
        raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
    params = param_group.get("params")
    if isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the "
                        "ordering of tensors in sets will change between runs; use a list instead")
    params = [params] if isinstance(params, torch.Tensor) else list(params or [])
    for p in params:
        if isinstance(p, torch.Tensor) and p.is_complex():
            raise TypeError(f"{optimizer} does not support complex parameters (params of dtype {p.dtype}); "
                            "view them as real with torch.view_as_real")
        if isinstance(p, torch.Tensor) and not p.is_floating_point():
            raise TypeError(f"{optimizer} needs floating-point params, got one of dtype {p.dtype}")
    return {**param_group, "params": params}


class CheckedOptimizer(torch.optim.Optimizer):
    """An optimizer whose defaults and every group added later pass ``check_hyperparameters`` (and
    ``checked_param_group``) before anything is stored; ``betas`` given as a list become a tuple."""

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        if isinstance(defaults.get("betas"), list):
            defaults["betas"] = tuple(defaults["betas"])
        self.check_hyperparameters(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def check_hyperparameters(hyperparameters: dict[str, Any]) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group = checked_param_group(param_group, type(self).__name__)
        self.check_hyperparameters({**self.defaults, **param_group})
        super().add_param_group(param_group)
