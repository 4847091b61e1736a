"""The optimizers NanoAdam is compared with, behind one registry (see ``registry.py``)."""

from .registry import (
    REGISTRY,
    MissingExtraError,
    OptimizerBundle,
    available_optimizers,
    build_optimizer,
    optimizer_state_bytes,
)

__all__ = ["REGISTRY", "MissingExtraError", "OptimizerBundle", "available_optimizers", "build_optimizer",
           "optimizer_state_bytes"]
