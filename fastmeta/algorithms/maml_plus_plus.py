"""MAML++: MAML with the stabilising and speeding-up changes of "How to train your MAML".

References:
    Antoniou, Edwards, Storkey. "How to train your MAML." ICLR 2019.
    https://arxiv.org/abs/1810.09502
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._learner import LossFn, MetaLearner, check_steps
from .._selection import Selection
from ..engines import Engine, InnerRates, MetaGrad, OuterObjective, Params


def multi_step_weights(steps: int, meta_step: int, anneal_iterations: int) -> tuple[float, ...]:
    """Weights of the query loss after each inner step, at meta-step ``meta_step``.

    They start equal (``1/steps``) and move linearly towards the last step over
    ``anneal_iterations`` meta-steps; every earlier step keeps at least ``0.03/steps``,
    as in the MAML++ reference implementation.
    """
    if steps == 1:
        return (1.0,)
    floor = 0.03 / steps
    decay = 1.0 / steps / anneal_iterations
    earlier = max(1.0 / steps - meta_step * decay, floor)
    last = min(1.0 / steps + meta_step * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return (earlier,) * (steps - 1) + (last,)


class MAMLPlusPlus(MetaLearner):
    """MAML++: MAML with a multi-step loss, learned per-step rates and per-step BatchNorm.

    Inner loop per task: ``φ_{s+1} = φ_s − α_{s,ℓ} ∇_φ L_support(φ_s)``, with a learned rate
    ``α_{s,ℓ}`` for every inner step ``s`` and parameter tensor ``ℓ`` (LSLR) and, while step
    ``s`` runs, BatchNorm weights and biases of their own for that step (BNWB). Outer:
    ``θ, α, γ, β ← opt(∇ mean_tasks Σ_s w_s L_query(φ_{s+1}))``: the query loss after every
    inner step (multi-step loss, MSL), with weights ``w_s`` annealed towards the last step;
    first-order meta-gradients for the first meta-steps, second-order afterwards (DA).
    Every component can be switched off; with all of them off this is :class:`MAML`.
    The paper's fifth change, a cosine-annealed outer learning rate, belongs to the outer
    optimiser: ``torch.optim.lr_scheduler.CosineAnnealingLR``.

    Per-step BatchNorm statistics (the paper's BNRS) have no counterpart: fastmeta never
    updates running statistics during inner loops; in train mode BatchNorm normalises with
    the batch's own statistics.

    Args:
        model: the network to meta-train.
        inner_lr: inner learning rate (the initial value of every learned rate).
        inner_steps: inner steps per task (the rates and BatchNorm weights are per step).
        multi_step_loss: use the query loss after every step (MSL).
        multi_step_iterations: meta-steps over which the MSL weights anneal towards the
            last step (the reference implementation: 10 epochs' worth).
        learned_rates: learn one rate per inner step and parameter tensor (LSLR).
        per_step_batch_norm: BatchNorm weights and biases per inner step (BNWB): the
            model's own before the first update, then ``step_norms`` row ``s - 1`` after
            ``s`` updates; they are meta-learned, not adapted. ``None`` (the default): on
            where the model has BatchNorm with trainable affine weights, off elsewhere (an
            MLP); ``True`` on a model without them is an error.
        first_order_iterations: first-order meta-gradients for this many meta-steps, then
            second order (derivative-order annealing, DA); 0 switches it off.
        loss_fn, inner_optimizer, inner_optimizer_kwargs, engine, compile, verify_engine, adapt:
            as for :class:`fastmeta.MAML`.
        memory_budget: as for :class:`fastmeta.MAML`.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``, as for :class:`fastmeta.MAML`.

    Example:
        >>> learner = fastmeta.MAMLPlusPlus(fastmeta.models.Conv4(num_classes=5),
        ...                                 inner_lr=0.01, inner_steps=5,
        ...                                 loss_fn="cross_entropy")
        >>> optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
        >>> learner.meta_step(batch, optimizer)

    References:
        Antoniou et al., ICLR 2019, https://arxiv.org/abs/1810.09502
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_lr: float,
        inner_steps: int = 5,
        multi_step_loss: bool = True,
        multi_step_iterations: int = 5000,
        learned_rates: bool = True,
        per_step_batch_norm: bool | None = None,
        first_order_iterations: int = 0,
        loss_fn: str | LossFn | None = None,
        inner_optimizer: str | type[torch.optim.Optimizer] = "sgd",
        inner_optimizer_kwargs: Mapping[str, Any] | None = None,
        engine: str | Engine = "auto",
        compile: bool = False,
        verify_engine: bool = True,
        memory_budget: int | str = "auto",
        precision: str | torch.dtype = "fp32",
        adapt: Selection | None = None,
    ) -> None:
        super().__init__(
            model, inner_lr=inner_lr, inner_steps=inner_steps, loss_fn=loss_fn,
            inner_optimizer=inner_optimizer, inner_optimizer_kwargs=inner_optimizer_kwargs,
            engine=engine, compile=compile, verify_engine=verify_engine,
            memory_budget=memory_budget, adapt=adapt, precision=precision,
        )
        self.multi_step_loss = bool(multi_step_loss)
        self.multi_step_iterations = check_steps("multi_step_iterations",
                                                 multi_step_iterations, 1)
        self.first_order_iterations = check_steps("first_order_iterations",
                                                  first_order_iterations, 0)
        named = dict(model.named_parameters())
        if per_step_batch_norm is not None and not isinstance(per_step_batch_norm, bool):
            raise TypeError(
                f"per_step_batch_norm must be True, False or None (on where the model has "
                f"affine BatchNorm), got {per_step_batch_norm!r}"
            )
        norms = self._batch_norm_parameters(model)
        self._norm_names = norms if per_step_batch_norm in (True, None) else ()
        if per_step_batch_norm and not self._norm_names:
            raise ValueError(
                "per_step_batch_norm=True, but the model has no BatchNorm layer with trainable "
                "affine weights; pass per_step_batch_norm=False"
            )
        # Before the first update the model's own weights serve; then one row per number
        # of updates made so far: 1..inner_steps.
        self.step_norms = nn.ParameterDict({
            name.replace(".", "-"): nn.Parameter(
                named[name].detach().unsqueeze(0).repeat(inner_steps,
                                                         *[1] * named[name].dim()))
            for name in self._norm_names
        })
        self._rate_keys = {n: n.replace(".", "-") for n in self.adapted_names()}
        self.step_rates = nn.ParameterDict({
            key: nn.Parameter(torch.full((inner_steps,), self.inner_lr,
                                         dtype=named[name].dtype, device=named[name].device))
            for name, key in self._rate_keys.items()
        }) if learned_rates else nn.ParameterDict()

    @staticmethod
    def _batch_norm_parameters(model: nn.Module) -> tuple[str, ...]:
        names = []
        for module_name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                for kind in ("weight", "bias"):
                    if getattr(module, kind).requires_grad:
                        names.append(f"{module_name}.{kind}" if module_name else kind)
        return tuple(names)

    def adapted_names(self) -> tuple[str, ...]:
        """Every trainable parameter except the per-step BatchNorm weights and biases."""
        norms = set(getattr(self, "_norm_names", ()))
        return tuple(n for n in super().adapted_names() if n not in norms)

    def inner_rates(self) -> InnerRates:
        """The learned rate of each step and parameter tensor (``inner_lr`` if off)."""
        return self._rates if len(self.step_rates) else super().inner_rates()

    def _rates(self, step: int) -> dict[str, Tensor]:
        return {name: self.step_rates[key][min(step, self.inner_steps - 1)]
                for name, key in self._rate_keys.items()}

    def step_parameters(self) -> Callable[[int], Params] | None:
        """BatchNorm weights and biases of the current step (``None`` if off)."""
        return self._norms if self._norm_names else None

    def _norms(self, step: int) -> Params:
        if step == 0:
            return {}
        row = min(step, self.inner_steps) - 1
        return {name: self.step_norms[name.replace(".", "-")][row] for name in self._norm_names}

    def outer_objective(self) -> OuterObjective:
        """The multi-step loss with this meta-step's weights (MAML's loss if off)."""
        if not self.multi_step_loss:
            return super().outer_objective()
        weights = multi_step_weights(self.inner_steps, self.meta_steps_taken,
                                     self.multi_step_iterations)
        return OuterObjective(self.loss_fn, weights)

    def meta_gradient_order(self) -> MetaGrad:
        """First order for the first ``first_order_iterations`` meta-steps, then second."""
        if self.meta_steps_taken < self.first_order_iterations:
            return MetaGrad.FIRST_ORDER
        return MetaGrad.SECOND_ORDER

    def extra_repr(self) -> str:
        return (f"multi_step_loss={self.multi_step_loss}, learned_rates="
                f"{bool(len(self.step_rates))}, per_step_batch_norm={bool(self._norm_names)}, "
                f"first_order_iterations={self.first_order_iterations}, " + super().extra_repr())
