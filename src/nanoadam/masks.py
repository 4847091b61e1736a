"""The per-tensor state NanoAdam works on, what one update or refresh needs besides it, and how a
refresh carries moments from the old mask to the new one.

A leaf module: ``functional`` (every path) and ``triton_kernels`` both build on it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .cohorts import Merge
from .rounding import STREAM_MOMENTS, STREAM_PARAM, hash32, round_to, salt
from .selection import ChunkLayout, cohort_ids, global_positions, pack_index


class Mask(NamedTuple):
    """The kept entries of one tensor and their moments (the optimizer's per-parameter state)."""

    index: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    layout: ChunkLayout


class UpdateTerms(NamedTuple):
    """What one tensor's update needs beyond the hyperparameters, at this step."""

    bias: tuple[float, ...]  # 16 step sizes lr / (1 - beta1^age), then 16 sqrt(1 - beta2^age), per cohort
    seed: int  # the parameter's ordinal: with ``step``, the salt of its random numbers
    step: int  # the optimizer step
    round_params: bool  # bf16 weights rounded stochastically (else to nearest)
    offset: int  # global flat position of the tensor's first local entry (FSDP2 shards)

    @property
    def moment_salt(self) -> int:
        return salt(self.seed, self.step, STREAM_MOMENTS)

    @property
    def param_salt(self) -> int | None:
        return salt(self.seed, self.step, STREAM_PARAM) if self.round_params else None


class RefreshTerms(NamedTuple):
    """What one tensor's refresh needs beyond the selection rule."""

    newborn: int  # cohort of newly selected entries
    merge: Merge | None  # cohorts merged at this refresh
    merge_salt: int  # stochastic rounding of moments rescaled by the merge
    random_salt: int  # keys of selection="random"
    offset: int


def moment_noise(at: torch.Tensor, salt_value: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16-bit rounding noise for exp_avg and exp_avg_sq at flat positions ``at``."""
    h = hash32(at + offset, salt_value)
    return h & 0xFFFF, h >> 16


def carry_moments(pos: torch.Tensor, layout: ChunkLayout, old: Mask | None, state_dtype: torch.dtype,
                  terms: RefreshTerms) -> Mask:
    """The mask of in-chunk positions ``pos`` with cohorts and moments: those of entries the old
    mask kept too (kept positions are globally ascending, so a sorted search matches them), after
    ``terms.merge``; zero moments in cohort ``terms.newborn`` for the others."""
    at = global_positions(pos, layout)
    device = at.device
    m = torch.zeros(layout.kept, device=device)
    v = torch.zeros(layout.kept, device=device)
    cohort = torch.full((layout.kept,), terms.newborn, dtype=torch.int64, device=device)
    if old is not None and old.layout.kept and layout.kept:
        old_at = global_positions(old.index, old.layout)
        j = torch.searchsorted(old_at, at).clamp_(max=old_at.numel() - 1)
        kept = old_at[j] == at
        old_m, old_v = old.exp_avg[j].float(), old.exp_avg_sq[j].float()
        old_cohort = cohort_ids(old.index, old.layout)[j]
        merge = terms.merge
        if merge is not None:
            joins = old_cohort == merge.young
            old_m = torch.where(joins, old_m * merge.m_factor, old_m)
            old_v = torch.where(joins, old_v * merge.v_factor, old_v)
            old_cohort = torch.where(joins, merge.old, old_cohort)
        m = torch.where(kept, old_m, m)
        v = torch.where(kept, old_v, v)
        cohort = torch.where(kept, old_cohort, cohort)
    # bf16 moments that a merge rescaled (or that come from float32 state) round stochastically;
    # bf16 values carried as they are need no rounding, and zeros none either.
    noise_m = noise_v = None
    if state_dtype == torch.bfloat16 and old is not None and (terms.merge is not None
                                                              or old.exp_avg.dtype != torch.bfloat16):
        noise_m, noise_v = moment_noise(at, terms.merge_salt, terms.offset)
    return Mask(pack_index(pos, cohort, layout), round_to(m, state_dtype, noise_m),
                round_to(v, state_dtype, noise_v), layout)
