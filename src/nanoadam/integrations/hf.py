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

Or let the Trainer build it, from the model it actually trains (after peft, accelerate wrapping)::

    from nanoadam.integrations.hf import NanoAdamCallback, NanoAdamFactory

    trainer = Trainer(model=model, args=args, train_dataset=train,
                      optimizer_cls_and_kwargs=(NanoAdamFactory, {"lr": args.learning_rate, "density": 0.1,
                                                                  "final_density": 0.01}),
                      callbacks=[NanoAdamCallback()])

transformers calls a class that is not an ``Optimizer`` as a factory, ``NanoAdamFactory()(model,
**kwargs)``, and TRL's ``SFTTrainer`` forwards the same argument. What the factory cannot reach:
the Trainer hands it the model and those keyword arguments only, not its ``TrainingArguments``,
so the learning rate, weight decay and Adam betas/eps must be given in the kwargs (``lr`` is
required: a silent default would ignore ``args.learning_rate``), and the density schedule learns
the run's length from :class:`NanoAdamCallback` (``state.max_steps`` at the start of training),
which also checks the kwargs against ``TrainingArguments`` and warns where they differ. NanoAdam
creates no per-parameter state before its first step, so accelerate may wrap or swap parameters
(FSDP2) after the factory ran. DeepSpeed ZeRO is refused: it flattens parameters into one buffer,
so per-tensor chunks, magnitudes and masks lose their meaning.
"""

from __future__ import annotations

import os
import warnings
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

    def __init__(self, scheduler: DensityScheduler | None):
        self.scheduler = scheduler

    def on_train_begin(self, args, state, control, **kwargs):
        if self.scheduler is not None:
            self.scheduler.set_step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.scheduler is not None:
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


def _deepspeed_active() -> bool:
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
        return True
    try:
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType
    except ImportError:
        return False
    return AcceleratorState._shared_state.get("distributed_type") == DistributedType.DEEPSPEED


class NanoAdamFactory:
    """``Trainer(optimizer_cls_and_kwargs=(NanoAdamFactory, kwargs))``: the Trainer calls
    ``NanoAdamFactory()(model, **kwargs)`` and gets a :class:`nanoadam.NanoAdam` over
    ``param_groups(model, head_names=..., head_lr=...)``. ``kwargs``: ``lr`` (required) and any
    NanoAdam argument, plus ``final_density`` and ``density_interval`` for the density schedule,
    which :class:`NanoAdamCallback` runs (it alone learns the run's length)."""

    def __call__(self, model: nn.Module, *, lr: float | None = None, final_density: float | None = None,
                 density_interval: int | None = None, head_names=None, head_lr: float | None = None,
                 **nanoadam_kwargs: Any) -> NanoAdam:
        if _deepspeed_active():
            raise ValueError("NanoAdam does not run under DeepSpeed ZeRO: it flattens parameters into one buffer, so "
                             "per-tensor chunks and magnitudes lose their meaning; use DDP or FSDP2 instead")
        if lr is None:
            raise ValueError("NanoAdamFactory needs lr in optimizer_cls_and_kwargs (the Trainer does not hand its "
                             "TrainingArguments to an optimizer factory): e.g. {'lr': args.learning_rate}")
        optimizer = NanoAdam(param_groups(model, head_names=head_names, head_lr=head_lr), lr=lr, **nanoadam_kwargs)
        if final_density is not None:
            # The schedule starts from the densities chosen here, not from those a resumed checkpoint loads.
            schedule = optimizer.density_schedule = {"final_density": final_density, "interval": density_interval,
                                                     "initial": [g["density"] for g in optimizer.param_groups]}

            def unscheduled(opt, args, kwargs):
                if not schedule.get("started"):
                    warnings.warn("final_density is set but no NanoAdamCallback runs the density schedule: pass "
                                  "callbacks=[NanoAdamCallback()] to the Trainer", UserWarning, stacklevel=2)
                    schedule["started"] = True  # warn once
            optimizer.register_step_post_hook(unscheduled)
        return optimizer


class NanoAdamCallback(DensitySchedulerCallback):
    """Goes with :class:`NanoAdamFactory`: at the start of training it warns where the factory's
    kwargs differ from ``TrainingArguments`` (learning rate, weight decay, betas, eps) and starts the
    density schedule over ``state.max_steps``, at the Trainer's step (resume included); then steps
    it after every optimizer step."""

    def __init__(self):
        super().__init__(None)  # the schedule needs the run's length: built at the start of training

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        nano = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        if not isinstance(nano, NanoAdam):
            return
        body = nano.param_groups[0]
        for name, ours, theirs in (("lr", body.get("initial_lr", body["lr"]), args.learning_rate),
                                   ("weight_decay", body["weight_decay"], args.weight_decay),
                                   ("betas", tuple(body["betas"]), (args.adam_beta1, args.adam_beta2)),
                                   ("eps", body["eps"], args.adam_epsilon)):
            if ours != theirs:
                warnings.warn(f"NanoAdam's {name} is {ours}, TrainingArguments' {theirs}; the optimizer uses its own "
                              "(pass it in optimizer_cls_and_kwargs to match)", UserWarning, stacklevel=2)
        schedule = getattr(nano, "density_schedule", None)
        if schedule:
            for group, density in zip(nano.param_groups, schedule["initial"]):
                group["density"] = density
            self.scheduler = DensityScheduler(nano, final_density=schedule["final_density"],
                                              total_steps=state.max_steps, interval=schedule["interval"])
            schedule["started"] = True
        super().on_train_begin(args, state, control, **kwargs)
