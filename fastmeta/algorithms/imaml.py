"""Implicit MAML: meta-gradients through the inner optimum, without unrolling the inner loop.

References:
    Rajeswaran, Finn, Kakade, Levine. "Meta-Learning with Implicit Gradients."
    NeurIPS 2019. https://arxiv.org/abs/1909.04630
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._learner import LossFn, MetaLearner, check_steps
from .._objectives import Proximal
from .._selection import Selection
from .._task import TaskBatch
from .._tree import Tree, call, index
from ..engines import Engine, InnerObjective, MetaLosses, Params, exact_layers


def conjugate_gradient(
    apply: Callable[[list[Tensor]], list[Tensor]], rhs: list[Tensor], *, steps: int,
    tolerance: float,
) -> list[Tensor]:
    """Solve ``A v = rhs`` for symmetric positive-definite ``A`` given as ``apply(v) = A v``.

    Starts from ``v = 0`` and stops after ``steps`` iterations or once the residual norm is
    below ``tolerance`` times that of ``rhs``.
    """
    x = [torch.zeros_like(r) for r in rhs]
    residual = [r.clone() for r in rhs]
    direction = [r.clone() for r in rhs]
    rr = sum(float((r * r).sum()) for r in residual)
    stop = tolerance**2 * rr
    for _ in range(steps):
        if rr <= stop or rr == 0.0:
            break
        applied = apply(direction)
        curvature = sum(float((d * a).sum()) for d, a in zip(direction, applied))
        alpha = rr / curvature
        x = [xi + alpha * d for xi, d in zip(x, direction)]
        residual = [r - alpha * a for r, a in zip(residual, applied)]
        new_rr = sum(float((r * r).sum()) for r in residual)
        direction = [r + (new_rr / rr) * d for r, d in zip(residual, direction)]
        rr = new_rr
    return x


class IMAML(MetaLearner):
    """iMAML: the inner loop solves a proximal problem; the meta-gradient is implicit.

    Inner loop per task: ``inner_steps`` optimiser steps from ``φ = θ`` on
    ``L_support(φ) + lam/2 · ‖φ − θ‖²``, with no graph kept. Meta-gradient: at the adapted
    ``φ``, solve ``(I + H/lam) v = ∇_φ L_query(φ)`` by conjugate gradient, with ``H`` the
    Hessian of ``L_support`` at ``φ`` applied through Hessian-vector products; ``v`` is the
    task's meta-gradient for θ (exact when the inner problem is solved exactly). Memory does
    not grow with ``inner_steps``.

    Args:
        model: the network to meta-train.
        inner_lr: inner learning rate.
        inner_steps: inner steps per task (enough to approach the proximal optimum).
        lam: strength of the proximal term (the paper's λ); larger keeps φ closer to θ.
        cg_steps: conjugate-gradient iterations per task.
        cg_tolerance: stop CG once the residual is below this fraction of the right side.
        loss_fn, inner_optimizer, inner_optimizer_kwargs, engine, verify_engine, adapt: as for
            :class:`fastmeta.MAML`.
        memory_budget: as for :class:`fastmeta.MAML`.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``, as for :class:`fastmeta.MAML`.

    Example:
        >>> learner = fastmeta.IMAML(model, inner_lr=0.05, inner_steps=16, lam=2.0,
        ...                          cg_steps=5)
        >>> learner.meta_step(batch, torch.optim.Adam(learner.parameters(), lr=1e-3))

    References:
        Rajeswaran et al., NeurIPS 2019, https://arxiv.org/abs/1909.04630
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_lr: float,
        inner_steps: int,
        lam: float,
        cg_steps: int = 5,
        cg_tolerance: float = 1e-10,
        loss_fn: str | LossFn | None = None,
        inner_optimizer: str | type[torch.optim.Optimizer] = "sgd",
        inner_optimizer_kwargs: Mapping[str, Any] | None = None,
        engine: str | Engine = "auto",
        verify_engine: bool = True,
        memory_budget: int | str = "auto",
        precision: str | torch.dtype = "fp32",
        adapt: Selection | None = None,
    ) -> None:
        super().__init__(
            model, inner_lr=inner_lr, inner_steps=inner_steps, loss_fn=loss_fn,
            inner_optimizer=inner_optimizer, inner_optimizer_kwargs=inner_optimizer_kwargs,
            engine=engine, verify_engine=verify_engine,
            memory_budget=memory_budget, adapt=adapt, precision=precision,
        )
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (
                math.isfinite(lam) and lam > 0):
            raise ValueError(f"lam must be a number > 0 (the proximal strength), got {lam!r}")
        if not 0 <= cg_tolerance < 1:
            raise ValueError(f"cg_tolerance must be in [0, 1), got {cg_tolerance!r}")
        self.lam = float(lam)
        self.cg_steps = check_steps("cg_steps", cg_steps, 1)
        self.cg_tolerance = float(cg_tolerance)

    def inner_objective(self) -> InnerObjective:
        """The support loss plus ``lam/2 · ‖φ − θ‖²``."""
        return Proximal(super().inner_objective(), self.lam)

    def meta_gradient(self, task: TaskBatch) -> MetaLosses:
        """Adapt without a graph, then add each task's implicit gradient to ``.grad``."""
        loop = self.inner_loop(task, self.inner_steps)
        adaptation = self._engine.adapt(self.module, task, loop)
        named = dict(self.module.named_parameters())
        totals = {n: torch.zeros_like(named[n]) for n in loop.adapted}
        query_losses = []
        for t in range(task.num_tasks):
            params = {n: p[t] for n, p in adaptation.params.items()}
            buffers = {n: b[t] for n, b in adaptation.buffers.items()}
            gradient, query_loss = self._implicit_gradient(task, t, params, buffers,
                                                           loop.adapted)
            query_losses.append(query_loss)
            for name, g in zip(loop.adapted, gradient):
                totals[name] += g / task.num_tasks
        for name, total in totals.items():
            param = named[name]
            param.grad = total if param.grad is None else param.grad + total
        return MetaLosses(torch.stack(query_losses), adaptation.support_losses)

    def _implicit_gradient(self, task: TaskBatch, t: int, params: Params, buffers: Params,
                           adapted: tuple[str, ...]) -> tuple[list[Tensor], Tensor]:
        """``(I + H/lam)⁻¹ ∇_φ L_query(φ)`` of task ``t`` by CG, and its query loss."""
        assert task.support_y is not None  # prepare refuses unlabelled support sets

        def loss_at(fast: list[Tensor], x: Tree, y: Tree) -> Tensor:
            state = {**params, **dict(zip(adapted, fast)),
                     **{n: b.clone() for n, b in buffers.items()}}
            return self.loss_fn(call(self.module, state, x), y)

        # Hessian-vector products differentiate the layers twice: exact forms (and the
        # math kernel of attention, CPU's fused one has no second derivative).
        with torch.enable_grad(), exact_layers(self.module, vectorised=False, second_order=True):
            fast = [params[n].detach().requires_grad_(True) for n in adapted]
            query_loss = loss_at(fast, index(task.query_x, t), index(task.query_y, t))
            rhs = list(torch.autograd.grad(query_loss, fast))
            support_loss = loss_at(fast, index(task.support_x, t), index(task.support_y, t))
            support_grad = torch.autograd.grad(support_loss, fast, create_graph=True)

            def apply(v: list[Tensor]) -> list[Tensor]:
                hv = torch.autograd.grad(support_grad, fast, grad_outputs=v,
                                         retain_graph=True)
                return [vi + hvi / self.lam for vi, hvi in zip(v, hv)]

            solution = conjugate_gradient(apply, rhs, steps=self.cg_steps,
                                          tolerance=self.cg_tolerance)
        return [s.detach() for s in solution], query_loss.detach()

    def meta_loss(self, batch: TaskBatch | Mapping[str, Any]) -> Tensor:
        """Not defined for iMAML.

        Raises:
            TypeError: always; the implicit meta-gradient is not the gradient of a graph
                fastmeta could return (nothing through the inner loop is kept).
        """
        raise TypeError(
            "IMAML has no differentiable meta-loss: its meta-gradient is computed implicitly "
            "at the adapted weights, without a graph through the inner loop. Use "
            "meta_step(), or MAML for a meta-loss"
        )

    def extra_repr(self) -> str:
        return f"lam={self.lam}, cg_steps={self.cg_steps}, " + super().extra_repr()
