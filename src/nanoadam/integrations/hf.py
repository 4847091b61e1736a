"""NanoAdam in ``transformers.Trainer``.

::

    from nanoadam.integrations.hf import nanoadam_for_trainer

    optimizer, callbacks = nanoadam_for_trainer(model, lr=1e-4, density=0.1, mask_interval=100,
                                                final_density=0.01, total_steps=args.max_steps)
    trainer = Trainer(model=model, args=args, train_dataset=train, optimizers=(optimizer, None),
                      callbacks=callbacks)
    trainer.train()                                  # or trainer.train(resume_from_checkpoint=True)

The optimizer is a :class:`nanoadam.NanoAdam` over :func:`nanoadam.param_groups` (head and norm
layers dense); the Trainer builds its LR scheduler around it and saves/loads its state in
checkpoints. With ``final_density``, a callback steps the :class:`nanoadam.DensityScheduler` after
every optimizer step and puts it back at the checkpoint's step when training resumes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..grouping import param_groups
from ..optimizer import NanoAdam
from ..schedule import DensityScheduler


def _trainer_callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError("nanoadam.integrations.hf needs transformers: pip install 'nanoadam[hf]'") from e
    return TrainerCallback


class DensitySchedulerCallback(_trainer_callback_base()):
    """Steps a DensityScheduler after each optimizer step; on (re)start aligns it with the
    Trainer's global step, so a resumed run follows the same density schedule."""

    def __init__(self, scheduler: DensityScheduler):
        self.scheduler = scheduler

    def on_train_begin(self, args, state, control, **kwargs):
        self.scheduler.set_step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.scheduler.step()


def nanoadam_for_trainer(model: nn.Module, *, lr: float, final_density: float | None = None,
                         total_steps: int | None = None, density_interval: int | None = None,
                         **nanoadam_kwargs: Any) -> tuple[NanoAdam, list]:
    """A NanoAdam for ``Trainer(optimizers=(optimizer, None))`` and the callbacks it needs
    (``density_interval=None``: the density changes on the optimizer's own refresh steps)."""
    optimizer = NanoAdam(param_groups(model), lr=lr, **nanoadam_kwargs)
    callbacks = []
    if final_density is not None:
        if total_steps is None:
            raise ValueError("final_density needs total_steps")
        scheduler = DensityScheduler(optimizer, final_density=final_density, total_steps=total_steps,
                                     interval=density_interval)
        callbacks.append(DensitySchedulerCallback(scheduler))
    return optimizer, callbacks
