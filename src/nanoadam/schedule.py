"""``DensityScheduler``: the paper's linear density decay, stepped like an LR scheduler."""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer


def linear_density(initial: float, final: float, step: int, total_steps: int, interval: int) -> float:
    """Density after ``step`` scheduler steps: linear from ``initial`` to ``final`` over
    ``total_steps``, changing only every ``interval`` steps, then constant at ``final``."""
    progress = min(1.0, (step // interval) * interval / total_steps)
    return initial + (final - initial) * progress


class DensityScheduler:
    """Decays the ``density`` of every sparse group of ``optimizer`` linearly to ``final_density``.

    Call ``step()`` once per optimizer step, after ``optimizer.step()``. The density changes only
    every ``interval`` steps and stays at ``final_density`` after ``total_steps``. A density change
    makes NanoAdam refresh the affected masks at its next step, so by default (``interval=None``)
    each group's density changes every ``mask_interval`` steps, right before one of the
    optimizer's own refresh steps: the schedule never adds a refresh. An explicit ``interval``
    other than ``mask_interval`` refreshes the masks at the schedule's changes too. Setting
    ``interval`` beyond ``total_steps`` disables the schedule, as in the paper.

    Args:
        optimizer: a NanoAdam (any optimizer whose groups have ``density`` and ``sparse``).
        final_density: target density, one number or one per param group.
        total_steps: steps over which the density decays.
        interval: steps between density changes; ``None``: each group's ``mask_interval``
            (required for groups with a static mask).
    """

    def __init__(self, optimizer: Optimizer, final_density: float | list[float], total_steps: int,
                 interval: int | None = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        groups = optimizer.param_groups
        if not all("density" in g for g in groups):
            raise TypeError("optimizer has param groups without a 'density' (expected a NanoAdam)")
        finals = list(final_density) if isinstance(final_density, (list, tuple)) else [final_density] * len(groups)
        if len(finals) != len(groups):
            raise ValueError(f"final_density has {len(finals)} values for {len(groups)} param groups")
        for f in finals:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
                raise ValueError(f"Invalid final_density: {f!r} (expected 0 < final_density <= 1)")
        for name, value in (("total_steps", total_steps), ("interval", interval)):
            if value is None and name == "interval":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (expected an int >= 1)")
        if interval is None and any(g.get("sparse", True) and g.get("mask_interval", 1) is None for g in groups):
            raise ValueError("Invalid interval: None follows each group's mask_interval, but a group has a static "
                             "mask (mask_interval=None); pass interval= (each change then refreshes that mask)")
        self.optimizer = optimizer
        self.initial_densities = [float(g["density"]) for g in groups]
        self.final_densities = [float(f) for f in finals]
        self.total_steps = total_steps
        self.interval = interval
        self.last_step = 0

    def intervals(self) -> list[int]:
        """Steps between density changes, per param group."""
        return [self.interval or g.get("mask_interval") or 1 for g in self.optimizer.param_groups]

    def densities(self, step: int | None = None) -> list[float]:
        """The density of each param group after ``step`` scheduler steps (default: now)."""
        step = self.last_step if step is None else step
        return [
            linear_density(d0, d1, step, self.total_steps, interval)
            for d0, d1, interval in zip(self.initial_densities, self.final_densities, self.intervals())
        ]

    def step(self) -> None:
        self.set_step(self.last_step + 1)

    def set_step(self, step: int) -> None:
        """Puts the schedule at ``step`` scheduler steps (e.g. the global step of a resumed run)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"Invalid step: {step!r} (expected an int >= 0)")
        self.last_step = step
        for group, density in zip(self.optimizer.param_groups, self.densities()):
            if group.get("sparse", True):
                group["density"] = density

    def get_last_density(self) -> list[float]:
        return [g["density"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        expected = set(self.state_dict())
        if set(state_dict) != expected:
            raise ValueError(f"DensityScheduler state_dict must have keys {sorted(expected)}, got {sorted(state_dict)}")
        self.__dict__.update(state_dict)
