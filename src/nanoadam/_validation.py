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
