"""The training recipe every optimizer gets (DESIGN.md section 5): linear warmup, then linear
decay to zero, gradient clipping, the final checkpoint scored. Shared by every experiment that
trains, so that no comparison gives one optimizer a schedule the others lack."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Recipe:
    warmup_fraction: float = 0.06  # of the run's steps, at least one step
    clip_norm: float | None = 1.0  # global gradient norm; None: no clipping

    def __post_init__(self):
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"Invalid warmup_fraction: {self.warmup_fraction} (expected 0 <= x < 1)")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"Invalid clip_norm: {self.clip_norm} (expected > 0 or None)")

    def warmup_steps(self, total_steps: int) -> int:
        return max(1, round(self.warmup_fraction * total_steps)) if self.warmup_fraction else 0

    def lr_factor(self, step: int, total_steps: int) -> float:
        """The factor on every group's base rate at 0-based ``step``: ``(step + 1) / warmup`` while
        warming up (the first step already moves), then linear decay that reaches
        ``1 / (total - warmup)`` at the last step."""
        warmup = self.warmup_steps(total_steps)
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        """A ``LambdaLR`` (stepped after each optimizer step) applying :meth:`lr_factor` to every
        group's own rate, so a head at its own rate keeps its ratio to the body."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step, total_steps))

    def clip(self, params: Iterable[torch.nn.Parameter]) -> float | None:
        """Clips the gradients of ``params`` to ``clip_norm`` (global norm); returns the norm before."""
        if self.clip_norm is None:
            return None
        grads = [p for p in params if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(grads, self.clip_norm)) if grads else 0.0


def rate_beyond_edge(rates: Iterable[float], best: float) -> float | None:
    """One grid step beyond ``best`` when it sits on an edge of the rates tried (the ratio of the
    two rates at that edge, rounded to 3 significant digits: 0.2, not 0.20000000000000004);
    None when it lies inside or fewer than two rates were tried. The tuning rule of DESIGN.md
    section 5: a best value at the edge of its grid extends the grid."""
    rates = sorted(rates)
    if len(rates) < 2 or rates[0] < best < rates[-1]:
        return None
    step = rates[0] ** 2 / rates[1] if best == rates[0] else rates[-1] ** 2 / rates[-2]
    return float(f"{step:.3g}")


def shuffled_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Batches of example indices, endlessly: each pass is a permutation drawn from a generator
    seeded with ``seed`` alone, so every optimizer sees the same batches for a given seed; a pass's
    last partial batch is filled from the next pass."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order += torch.randperm(n, generator=gen).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        yield batch
