"""Engines: how a learner's inner loop is run and differentiated.

- ``"higher"``: higher's functional copies and differentiable optimisers, task by task;
  runs any module and any optimiser higher knows.
- ``"vmap"``: ``torch.func`` (``functional_call`` + ``grad`` + ``vmap`` over tasks), the
  fast path; optionally ``torch.compile``d.
- ``"auto"`` (default): ``"vmap"`` wherever it works, ``"higher"`` otherwise, with a
  warning that names the reason.
"""

from __future__ import annotations

from torch import nn

from .._inner_optim import InnerOptimizer
from ._auto import AutoEngine, vmap_obstacle
from ._base import Engine, InnerLoop, InnerLoopOutput, LearnedLoss, MetaGrad
from ._higher import DifferentiableAdam, DifferentiableAdamW, HigherEngine
from ._vmap import VmapEngine

ENGINES = ("auto", "vmap", "higher")


def resolve_engine(
    engine: str, model: nn.Module, optimizer: InnerOptimizer, *, compile: bool = False
) -> Engine:
    """The engine named ``engine`` for this model and inner optimiser.

    Raises:
        ValueError: unknown name, or a configuration the named engine cannot run.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")
    if engine == "higher":
        if compile:
            raise ValueError(
                "compile=True needs the vectorised engine; use engine='vmap' or 'auto', or "
                "compile=False with engine='higher'"
            )
        return HigherEngine()
    if engine == "vmap":
        obstacle = vmap_obstacle(model, optimizer)
        if obstacle:
            raise ValueError(
                f"engine='vmap' cannot run this learner: {obstacle}; use engine='higher' or 'auto'"
            )
        return VmapEngine(compile=compile)
    return AutoEngine(model, optimizer, compile=compile)


__all__ = [
    "ENGINES",
    "AutoEngine",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "Engine",
    "HigherEngine",
    "InnerLoop",
    "InnerLoopOutput",
    "LearnedLoss",
    "MetaGrad",
    "VmapEngine",
    "resolve_engine",
]
