"""``engine="auto"``: the vectorised engine wherever it works, higher otherwise."""

from __future__ import annotations

import warnings

from torch import nn

from .._inner_optim import InnerOptimizer
from .._task import Task
from ._base import Engine, InnerLoop, InnerLoopOutput, MetaGrad
from ._higher import HigherEngine
from ._vmap import VmapEngine


def vmap_obstacle(model: nn.Module, optimizer: InnerOptimizer) -> str | None:
    """Why the vectorised engine cannot run this configuration, or ``None``."""
    if not optimizer.functional:
        return (
            f"inner_optimizer={optimizer.name!r} has no functional rule in fastmeta "
            f"(the vectorised engine supports 'sgd', 'adam' and 'adamw')"
        )
    for name, module in model.named_modules():
        if isinstance(module, nn.RNNBase):
            return (
                f"submodule {name!r} is a {type(module).__name__}, which torch.func cannot "
                f"vectorise over tasks (no batching rule for its fused kernel)"
            )
    return None


class AutoEngine(Engine):
    """Tries the vectorised engine first and falls back to higher, saying why, once."""

    def __init__(self, model: nn.Module, optimizer: InnerOptimizer, *, compile: bool) -> None:
        obstacle = vmap_obstacle(model, optimizer)
        self._current: Engine = HigherEngine() if obstacle else VmapEngine(compile=compile)
        self.name = self._current.name
        if obstacle:
            self._warn(obstacle)

    @staticmethod
    def _warn(reason: str) -> None:
        warnings.warn(
            f"engine='auto' uses the 'higher' engine: {reason}. Pass engine='higher' to "
            f"choose it explicitly and silence this warning.",
            UserWarning,
            stacklevel=5,
        )

    def run(
        self,
        module: nn.Module,
        task: Task,
        loop: InnerLoop,
        meta_grad: MetaGrad,
        *,
        backward: bool = False,
        keep_params: bool = False,
        query: bool = True,
    ) -> InnerLoopOutput:
        def attempt() -> InnerLoopOutput:
            return self._current.run(
                module,
                task,
                loop,
                meta_grad,
                backward=backward,
                keep_params=keep_params,
                query=query,
            )

        try:
            return attempt()
        except RuntimeError as error:
            if not isinstance(self._current, VmapEngine):
                raise
            # torch.func refuses the model (e.g. a forward that writes into a buffer in
            # place). higher runs any module, so switch for good; if higher fails too, the
            # problem was not the engine and its error is the one to see.
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            self._current = HigherEngine()
            self.name = self._current.name
            self._warn(f"the vectorised engine failed on this model ({message})")
            return attempt()
