"""NanoAdam: finetune large pretrained models by updating only their smallest weights."""

from ._config import config, show_config
from .grouping import param_groups
from .optimizer import NanoAdam
from .schedule import DensityScheduler

__all__ = ["NanoAdam", "DensityScheduler", "param_groups", "config", "show_config"]
__version__ = "0.1.0"
