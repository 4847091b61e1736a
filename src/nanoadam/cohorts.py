"""Refresh cohorts: how a newly selected entry gets the bias correction of a fresh Adam.

An entry selected at a mask refresh starts from zero moments and must then move like a
``torch.optim.Adam`` started at that step (DESIGN.md section 1, point 2): its bias correction
counts *its own* age, ``1 - beta^a`` with ``a`` the updates since it joined, at every step, not
only the first. One optimizer-wide correction cannot do that (a late entry would take steps of
several ``lr`` or freeze), and a per-entry age would cost bytes. All entries selected by the same
refresh share their age, so NanoAdam tracks *cohorts*: each sparse parameter keeps a table of
``COHORTS = 16`` birth steps (``state["cohort_born"]``, its own step count at the refresh that
created the cohort; 0 marks a free slot), and each kept entry names its cohort in the four spare
bits of its stored index (``nanoadam.selection``: an int16 in a 4096-entry chunk needs 12 bits for
the position). The update then uses, per entry, ``lr / (1 - beta1^a)`` and ``sqrt(1 - beta2^a)``
of its cohort's age.

Sixteen slots run out when masks refresh often. At a refresh that finds every slot taken, the
two cohorts adjacent in age whose bias corrections are closest, ``max over beta of
(1 - beta^a_old) / (1 - beta^a_young)`` (about 1 for cohorts older than ``1 / (1 - beta2)``
steps), are merged: the younger one's entries join the older one, their moments multiplied by
``(1 - beta^a_old) / (1 - beta^a_young)`` so that their bias-corrected moments are unchanged, and
its slot takes the new cohort. Merging into the *older* cohort leaves populated old cohorts
untouched, so at ``density=1`` (where every entry is in the first cohort) NanoAdam stays
``torch.optim.AdamW`` step for step; a merged entry carries ``a_old - a_young`` phantom steps of its
own average from then on, an error that fades as it ages. Simulated against fresh Adam for an
entry joining at step 1001 (``tests/test_optimizer.py`` holds the optimizer to the same cases):
within 1 % in total movement for ``mask_interval >= 20``; at ``mask_interval = 1`` (a refresh every
step) 0.85x after a first-gradient spike and 1.22x under gradients growing 3 % a step.

The table is a pure function of the refresh steps and the parameter's step count, never of
which entries a cohort holds, so every DDP rank and every FSDP2 shard of a parameter keeps the
same table (a plain tensor in the state dict).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

COHORTS = 16
FREE = 0  # cohort_born value of an unused slot (steps count from 1)


class Merge(NamedTuple):
    """At a refresh: entries of cohort ``young`` join cohort ``old``; their moments are multiplied
    by ``m_factor`` and ``v_factor``."""

    young: int
    old: int
    m_factor: float
    v_factor: float


def new_table() -> torch.Tensor:
    return torch.zeros(COHORTS, dtype=torch.int64)


def _correction_ratio(beta: float, a_old: int, a_young: int) -> float:
    """``(1 - beta^a_old) / (1 - beta^a_young)``: how much more an older cohort's moments have
    accumulated; the factor that rescales a younger cohort's moments when it joins the older."""
    return (1 - beta**a_old) / (1 - beta**a_young) if beta > 0 else 1.0


def admit(born: list[int], step: int, betas: tuple[float, float]) -> tuple[int, Merge | None]:
    """Makes room for a cohort born at ``step`` (the parameter's step count at the refresh, before
    whose update the table is consulted); changes ``born`` in place and returns the new cohort's
    slot and the merge that freed it, if one was needed."""
    for slot, b in enumerate(born):
        if b == FREE:
            born[slot] = step
            return slot, None
    order = sorted(range(COHORTS), key=lambda c: born[c])  # oldest first (births are distinct)
    ages = [step - born[c] for c in order]  # updates each cohort has had so far
    best = min(range(COHORTS - 1),
               key=lambda j: (max(_correction_ratio(b, ages[j], ages[j + 1]) for b in betas), j))
    old, young = order[best], order[best + 1]
    m_factor, v_factor = (_correction_ratio(b, ages[best], ages[best + 1]) for b in betas)
    merge = Merge(young, old, m_factor, v_factor)
    born[young] = step
    return young, merge


def bias_table(born: tuple[int, ...], step: float, lr: float, betas: tuple[float, float]) -> tuple[float, ...]:
    """Per cohort at this update (``step`` counts it): 16 values ``lr / (1 - beta1^a)``, then 16
    values ``sqrt(1 - beta2^a)``, with ``a = step - born + 1`` (free slots: age 1)."""
    b1, b2 = betas
    ages = [step - b + 1 if b != FREE else 1 for b in born]
    return tuple([lr / (1 - b1**a) for a in ages] + [(1 - b2**a) ** 0.5 for a in ages])
