"""One registry of every learner, driving the generic protocol tests.

Each entry builds a learner on any model with a ``head`` submodule (``inner_steps=2``);
adding an algorithm to fastmeta means adding it here, and every protocol test covers it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import fastmeta


@dataclass(frozen=True)
class Algorithm:
    """How to build a learner, and what its ``meta_step`` reports.

    Attributes:
        build: ``build(model, **options) -> learner`` (options: ``engine``, ...).
        exact: its meta-gradient is the gradient of ``meta_loss`` (finite differences apply).
        baseline: ``meta_step`` is ordinary training on the pooled examples: no inner loop
            (``support_losses`` has no columns), the model's own buffers are updated, no engine.
    """

    build: Callable[..., fastmeta.MetaLearner]
    exact: bool = False
    baseline: bool = False

    @property
    def inner_steps(self) -> int:
        """Columns of ``MetaStepResult.support_losses``."""
        return 0 if self.baseline else 2


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _daml(model: nn.Module, **options: Any) -> fastmeta.MetaLearner:
    return fastmeta.DAML(model, adaptation_loss=lambda out: (out**2).mean(), inner_lr=0.01,
                         inner_steps=2, **options)


def _maml_plus_plus(model: nn.Module, **options: Any) -> fastmeta.MetaLearner:
    return fastmeta.MAMLPlusPlus(model, inner_lr=0.01, inner_steps=2, **options)


ALGORITHMS: dict[str, Algorithm] = {
    "maml": Algorithm(lambda m, **o: fastmeta.MAML(m, inner_lr=0.01, inner_steps=2, **o),
                      exact=True),
    "fomaml": Algorithm(lambda m, **o: fastmeta.FOMAML(m, inner_lr=0.01, inner_steps=2, **o)),
    "reptile": Algorithm(lambda m, **o: fastmeta.Reptile(m, inner_lr=0.01, inner_steps=2,
                                                          inner_batch_size=2, **o)),
    "metasgd": Algorithm(lambda m, **o: fastmeta.MetaSGD(m, inner_lr=0.01, inner_steps=2, **o),
                         exact=True),
    "anil": Algorithm(lambda m, **o: fastmeta.ANIL(m, head="head", inner_lr=0.01,
                                                   inner_steps=2, **o), exact=True),
    "daml": Algorithm(_daml, exact=True),
    "maml++": Algorithm(_maml_plus_plus, exact=True),
    "imaml": Algorithm(lambda m, **o: fastmeta.IMAML(m, inner_lr=0.01, inner_steps=2, lam=1.0,
                                                     **o)),
    "joint": Algorithm(lambda m, **o: fastmeta.JointTraining(m, inner_lr=0.01, inner_steps=2,
                                                            **o), baseline=True),
}


def seeded(factory: Callable[[], nn.Module], dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return factory().to(dtype)
