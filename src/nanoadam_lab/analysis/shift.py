"""How far finetuning moved a model: L2 parameter shift and the fraction of weights never touched.

Both exclude the classifier head (paper Table 5 and Fig. 12c measure the backbone): the head is
new and task specific, so every optimizer trains all of it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from nanoadam.grouping import DEFAULT_HEAD_NAMES, is_head


def head_keys(model: nn.Module, head_names: Iterable[str] = DEFAULT_HEAD_NAMES) -> set[str]:
    """The state-dict keys (parameters and buffers) under the model's head modules (``classifier.*`` for BERT)."""
    heads = [name for name, _ in model.named_modules() if is_head(name, tuple(head_names))]
    return {k for k in model.state_dict() if any(k.startswith(h + ".") for h in heads)}


def backbone_snapshot(model: nn.Module, head_names: Iterable[str] = DEFAULT_HEAD_NAMES) -> dict[str, torch.Tensor]:
    """Copies of the trainable non-head parameters, to compare against after training."""
    heads = head_keys(model, head_names)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and n not in heads}


def shift_report(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> dict[str, float]:
    """``l2_shift``: L2 norm of (now - snapshot) over all snapshot entries; ``untouched_fraction``:
    the share of those entries that are bitwise unchanged; ``relative_shift``: l2_shift divided by
    the snapshot's L2 norm."""
    params = dict(model.named_parameters())
    sq = 0.0
    base_sq = 0.0
    same = 0
    total = 0
    for name, before in snapshot.items():
        now = params[name].detach()
        diff = now.float() - before.float()
        sq += float(diff.pow(2).sum())
        base_sq += float(before.float().pow(2).sum())
        same += int((now == before).sum())
        total += before.numel()
    return {"l2_shift": sq**0.5, "relative_shift": (sq / base_sq) ** 0.5 if base_sq else 0.0,
            "untouched_fraction": same / total if total else 1.0, "backbone_params": total}
