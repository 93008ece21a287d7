"""Engines: how a learner's inner loop is run and differentiated.

- ``"higher"``: higher's functional copies and differentiable optimisers, task by task;
  runs any module and any optimiser higher knows.
- ``"vmap"``: ``torch.func`` (``functional_call`` + ``grad`` + ``vmap`` over tasks), the
  fast path; optionally ``torch.compile``d.
- ``"auto"`` (default): ``"vmap"`` where a first-call check finds it exact for the model,
  ``"higher"`` otherwise, with a warning that names the reason.

Every engine runs the layers whose torch kernels give wrong or missing meta-gradients in
exact forms (:func:`exact_layers`) and refuses the ones no engine can run exactly.
"""

from __future__ import annotations

from torch import nn

from .._inner_optim import InnerOptimizer
from ._auto import (
    TORCH_FUNC_REFUSALS,
    AutoEngine,
    EngineDecision,
    is_torch_func_refusal,
    vmap_obstacle,
)
from ._base import Engine, InnerLoop, InnerLoopOutput, LearnedLoss, MetaGrad
from ._exact import exact_layers, refused_layer, without_randomness
from ._higher import DifferentiableAdam, DifferentiableAdamW, HigherEngine
from ._vmap import VmapEngine

ENGINES = ("auto", "vmap", "higher")


def resolve_engine(
    engine: str,
    model: nn.Module,
    optimizer: InnerOptimizer,
    *,
    compile: bool = False,
    verify: bool = True,
) -> Engine:
    """The engine named ``engine`` for this model and inner optimiser.

    Args:
        verify: for ``"auto"``, check the vectorised engine against higher before the
            first call of each kind.

    Raises:
        ValueError: unknown name, a model no engine runs exactly, or a configuration the
            named engine cannot run.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")
    refusal = refused_layer(model)
    if refusal:
        raise ValueError(f"fastmeta cannot meta-learn this model: {refusal}")
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
    return AutoEngine(model, optimizer, compile=compile, verify=verify)


__all__ = [
    "ENGINES",
    "TORCH_FUNC_REFUSALS",
    "AutoEngine",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "Engine",
    "EngineDecision",
    "HigherEngine",
    "InnerLoop",
    "InnerLoopOutput",
    "LearnedLoss",
    "MetaGrad",
    "VmapEngine",
    "exact_layers",
    "is_torch_func_refusal",
    "refused_layer",
    "resolve_engine",
    "without_randomness",
]
