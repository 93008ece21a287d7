"""fastmeta: turn any PyTorch model into a meta-learner.

Example:
    >>> import fastmeta, torch
    >>> learner = fastmeta.MAML(my_model, inner_lr=0.01, inner_steps=1)
    >>> optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    >>> for batch in loader:                      # {"train": [x, y], "test": [x, y]}
    ...     result = learner.meta_step(batch, optimizer)
    >>> adapted = learner.adapt(support_x, support_y, steps=10)
    >>> prediction = adapted(query_x)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import distributed, models
from ._gradcheck import GradcheckReport, gradcheck
from ._inner_optim import INNER_OPTIMIZERS
from ._learner import (
    AdaptedModel,
    AdaptedTasks,
    DivergenceError,
    MetaLearner,
    MetaStepResult,
)
from ._task import TaskBatch
from .algorithms import (
    ANIL,
    DAML,
    FOMAML,
    IMAML,
    MAML,
    JointTraining,
    MAMLPlusPlus,
    MetaSGD,
    Reptile,
)

Task = TaskBatch  # the former name, kept so that existing code runs

try:
    __version__ = version("fastmeta")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "ANIL",
    "DAML",
    "FOMAML",
    "IMAML",
    "INNER_OPTIMIZERS",
    "MAML",
    "MAMLPlusPlus",
    "AdaptedModel",
    "AdaptedTasks",
    "DivergenceError",
    "GradcheckReport",
    "JointTraining",
    "MetaLearner",
    "MetaSGD",
    "MetaStepResult",
    "Reptile",
    "Task",
    "TaskBatch",
    "__version__",
    "distributed",
    "gradcheck",
    "models",
]
