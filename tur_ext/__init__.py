"""tur_ext: all-in-one image restoration trained with Task Uncertainty Regularization (TUR).

The loss is a fused C++/CUDA custom op (``torch.ops.tur.task_uncertainty_loss``); see :mod:`tur_ext.ops`.
"""
from . import ops, reference
from .loss_common import TURLossOutput
from .losses import TaskUncertaintyLoss, task_uncertainty_loss
from .ops import deform_conv2d
from .tasks import KNOWN_TASKS, TASK_SETS, TaskSet

__version__ = "0.1.0"

__all__ = [
    "KNOWN_TASKS",
    "TASK_SETS",
    "TURLossOutput",
    "TaskSet",
    "TaskUncertaintyLoss",
    "deform_conv2d",
    "ops",
    "reference",
    "task_uncertainty_loss",
]
