"""Small helpers for transformers models shared by the experiments and the benchmarks."""

from __future__ import annotations


def checkpoint_activations(model) -> None:
    """Activation (gradient) checkpointing of every layer, non-reentrant: under the name transformers 5
    gives it, or the older ``gradient_checkpointing_enable``."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
