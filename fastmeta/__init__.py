"""fastmeta: turn any PyTorch model into a meta-learner.

Example:
    >>> import torch, fastmeta
    >>> model = fastmeta.models.SineMLP()
    >>> learner = fastmeta.MAML(model, inner_lr=0.01, inner_steps=1)
    >>> optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    >>> tasks = fastmeta.data.sinusoid(10, test_shots=10, seed=0)
    >>> loader = fastmeta.data.BatchMetaDataLoader(tasks, batch_size=25)
    >>> batch = next(iter(loader))               # {"train": [x, y], "test": [x, y]}
    >>> result = learner.meta_step(batch, optimizer)
    >>> support_x, support_y = batch["train"][0][0], batch["train"][1][0]   # task 0
    >>> adapted = learner.adapt(support_x, support_y, steps=10)
    >>> prediction = adapted(batch["test"][0][0])
"""

import importlib as _importlib
from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version
from types import ModuleType as _ModuleType

from . import distributed, engines, models
from ._example_shape import AmbiguousShapeWarning
from ._gradcheck import GradcheckReport, gradcheck
from ._inner_optim import INNER_OPTIMIZERS
from ._learner import (
    AdaptedModel,
    AdaptedTasks,
    DivergenceError,
    MetaLearner,
    MetaStepResult,
)
from ._losses import LOSSES, Loss
from ._selection import select_parameters
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
    __version__ = _version("fastmeta")
except _PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "ANIL",
    "DAML",
    "FOMAML",
    "IMAML",
    "INNER_OPTIMIZERS",
    "LOSSES",
    "MAML",
    "MAMLPlusPlus",
    "AdaptedModel",
    "AmbiguousShapeWarning",
    "AdaptedTasks",
    "DivergenceError",
    "GradcheckReport",
    "JointTraining",
    "Loss",
    "MetaLearner",
    "MetaSGD",
    "MetaStepResult",
    "Reptile",
    "Task",
    "TaskBatch",
    "__version__",
    "bench",
    "data",
    "distributed",
    "engines",
    "gradcheck",
    "models",
    "select_parameters",
]

# Imported on first use, so that ``import fastmeta`` stays light.
_LAZY_SUBPACKAGES = ("bench", "data")


def __getattr__(name: str) -> _ModuleType:
    if name in _LAZY_SUBPACKAGES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
