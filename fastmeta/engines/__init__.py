"""Engines: how a learner's inner loop is run and differentiated.

- ``"higher"``: higher's functional copies, task by task; runs any module and any
  optimiser higher knows.
- ``"vmap"``: ``torch.func`` (``functional_call`` + ``grad`` + ``vmap`` over tasks), the
  fast path; optionally ``torch.compile``d.
- ``"loop"``: ``functional_call`` and autograd, task by task: the memory of one task,
  and no batching rule involved.
- ``"auto"`` (default): ``"vmap"`` where a first-call check finds it exact for the model,
  otherwise the faster of ``"higher"`` and ``"loop"`` (timed on the first meta-steps; one
  that cannot run the model is left out), with a warning that names the reason; within a
  memory budget (``memory_budget=``), from a measured footprint of one task.

Every engine runs the layers whose torch kernels give wrong or missing meta-gradients in
exact forms (:func:`exact_layers`) and refuses the ones no engine can run exactly.
"""

from __future__ import annotations

from torch import nn

from .._inner_optim import InnerOptimizer
from ._auto import (
    PROBE_STEPS,
    TORCH_FUNC_REFUSALS,
    AutoEngine,
    EngineDecision,
    is_torch_func_refusal,
    smaller_probe,
    vmap_obstacle,
)
from ._base import (
    Adaptation,
    Engine,
    InnerContext,
    InnerLoop,
    InnerObjective,
    InnerRates,
    MetaGrad,
    MetaLosses,
    OuterObjective,
    Params,
)
from ._exact import exact_layers, refused_layer, without_randomness
from ._higher import HigherEngine
from ._loop import LoopEngine
from ._memory import SavedTensorMeter, is_out_of_memory, parse_memory_budget
from ._tuner import Tuner
from ._vmap import VmapEngine

ENGINES = ("auto", "vmap", "loop", "higher")


def resolve_engine(
    engine: str | Engine,
    model: nn.Module,
    optimizer: InnerOptimizer,
    *,
    compile: bool = False,
    verify: bool = True,
    memory_budget: int | None = None,
) -> Engine:
    """The engine named ``engine`` for this model and inner optimiser.

    Args:
        verify: for ``"auto"``, check the vectorised engine against higher before the
            first call of each kind.
        memory_budget: for ``"auto"``, bytes a meta-step may add to the memory in use
            (:func:`parse_memory_budget`; ``None``: a safe fraction of what is free).

    Raises:
        ValueError: unknown name, a model no engine runs exactly, or a configuration the
            named engine cannot run.
    """
    if isinstance(engine, Engine):  # an engine object with options of its own
        if compile:
            raise ValueError("compile=True applies to engine names; pass "
                             "VmapEngine(compile=True) as the engine object instead")
        refusal = refused_layer(model)
        if refusal:
            raise ValueError(f"fastmeta cannot meta-learn this model: {refusal}")
        return engine
    if engine not in ENGINES:
        raise ValueError(
            f"unknown engine {engine!r}; choose one of {list(ENGINES)} or pass an engine "
            f"object such as fastmeta.engines.LoopEngine(checkpoint_steps=True)")
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
    if engine == "loop":
        if compile:
            raise ValueError("compile=True needs the vectorised engine; use engine='vmap' or "
                             "'auto', or compile=False with engine='loop'")
        if not optimizer.functional:
            reason = vmap_obstacle(model, optimizer)
            raise ValueError(f"engine='loop' cannot run this learner: {reason}; use "
                             f"engine='higher' or 'auto'")
        return LoopEngine()
    if engine == "vmap":
        obstacle = vmap_obstacle(model, optimizer)
        if obstacle:
            raise ValueError(
                f"engine='vmap' cannot run this learner: {obstacle}; use engine='higher' or 'auto'"
            )
        return VmapEngine(compile=compile)
    return AutoEngine(model, optimizer, compile=compile, verify=verify,
                      memory_budget=memory_budget)


__all__ = [
    "ENGINES",
    "PROBE_STEPS",
    "TORCH_FUNC_REFUSALS",
    "Tuner",
    "Adaptation",
    "AutoEngine",
    "Engine",
    "EngineDecision",
    "HigherEngine",
    "InnerContext",
    "InnerLoop",
    "InnerObjective",
    "InnerRates",
    "LoopEngine",
    "MetaGrad",
    "MetaLosses",
    "OuterObjective",
    "Params",
    "SavedTensorMeter",
    "VmapEngine",
    "exact_layers",
    "is_out_of_memory",
    "is_torch_func_refusal",
    "parse_memory_budget",
    "refused_layer",
    "resolve_engine",
    "smaller_probe",
    "without_randomness",
]
