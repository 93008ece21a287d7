"""Inner-loop optimisers: resolving the user's choice, and pure update rules.

The update rules follow ``torch.optim`` step for step (same operations, same
order), but return new tensors instead of writing in place, so they can be
differentiated through (second-order MAML) and vectorised with ``torch.func``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import torch
from torch import Tensor

# The inner optimisers, by the name users may pass, each with the settings of fastmeta's
# own update rule (SGD, Adam and AdamW: ``rule_of`` below, used by every engine), or
# ``None`` for the ones only higher's differentiable optimisers run (the higher engine).
# Anything else (maximize, foreach, fused, capturable, ...) would be silently ignored by
# a differentiable inner loop, so it is rejected instead.
_REGISTRY: dict[str, tuple[type[torch.optim.Optimizer], frozenset[str] | None]] = {
    "sgd": (torch.optim.SGD, frozenset({"momentum", "dampening", "nesterov", "weight_decay"})),
    "adam": (torch.optim.Adam, frozenset({"betas", "eps", "weight_decay", "amsgrad"})),
    "adamw": (torch.optim.AdamW, frozenset({"betas", "eps", "weight_decay", "amsgrad"})),
    "adagrad": (torch.optim.Adagrad, None),
    "adadelta": (torch.optim.Adadelta, None),
    "adamax": (torch.optim.Adamax, None),
    "asgd": (torch.optim.ASGD, None),
    "rmsprop": (torch.optim.RMSprop, None),
    "rprop": (torch.optim.Rprop, None),
}
INNER_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    name: cls for name, (cls, _) in _REGISTRY.items()
}
FUNCTIONAL_OPTIMIZERS = tuple(name for name, (_, kw) in _REGISTRY.items() if kw is not None)
_FUNCTIONAL_KWARGS = {cls: kw for cls, kw in _REGISTRY.values() if kw is not None}
_NEVER_ALLOWED = frozenset({"lr", "maximize", "foreach", "fused", "capturable", "differentiable"})


@dataclass(frozen=True)
class InnerOptimizer:
    """A validated inner-loop optimiser: a ``torch.optim`` class and its settings.

    Attributes:
        cls: the ``torch.optim.Optimizer`` subclass whose update rule the inner loop follows.
        kwargs: its settings, without the learning rate (that is the learner's ``inner_lr``).
    """

    cls: type[torch.optim.Optimizer]
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Lower-case name, e.g. ``"adam"``."""
        return self.cls.__name__.lower()

    @property
    def functional(self) -> bool:
        """Whether fastmeta has its own update rule for it (SGD, Adam, AdamW)."""
        return self.cls in _FUNCTIONAL_KWARGS

    def rule(self) -> UpdateRule:
        """fastmeta's update rule with these settings.

        Raises:
            ValueError: only higher's differentiable optimisers run this one.
        """
        settings = self.settings
        if self.cls is torch.optim.SGD:
            return SGD(momentum=settings["momentum"], dampening=settings["dampening"],
                       nesterov=settings["nesterov"], weight_decay=settings["weight_decay"])
        if self.cls in (torch.optim.Adam, torch.optim.AdamW):
            return Adam(betas=tuple(settings["betas"]), eps=settings["eps"],
                        weight_decay=settings["weight_decay"], amsgrad=settings["amsgrad"],
                        decoupled_weight_decay=self.cls is torch.optim.AdamW)
        raise ValueError(
            f"inner_optimizer={self.name!r} has no update rule in fastmeta (it has one for "
            f"{', '.join(repr(n) for n in FUNCTIONAL_OPTIMIZERS)}); only the higher engine "
            f"runs it, with higher's differentiable optimiser"
        )

    def build(self, params: Any, lr: float) -> torch.optim.Optimizer:
        """A real ``torch.optim`` instance over ``params`` (used by the higher engine)."""
        return self.cls(params, lr=lr, **self.kwargs)  # type: ignore[call-arg]

    @cached_property
    def settings(self) -> dict[str, Any]:
        """All hyperparameters as ``torch.optim`` would fill them in (defaults included)."""
        probe = self.build([torch.zeros(1, requires_grad=True)], lr=1.0)
        group = probe.param_groups[0]
        return {k: v for k, v in group.items() if k not in ("params", "lr")}


def resolve_inner_optimizer(
    inner_optimizer: str | type[torch.optim.Optimizer],
    inner_optimizer_kwargs: Mapping[str, Any] | None,
) -> InnerOptimizer:
    """Validate the user's ``inner_optimizer`` and ``inner_optimizer_kwargs``.

    Raises:
        ValueError: unknown name, unsupported class, or settings the optimiser rejects.
        TypeError: an optimiser instance instead of a name or class.
    """
    if isinstance(inner_optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"inner_optimizer must be a name or a torch.optim class, got an instance "
            f"{type(inner_optimizer).__name__}(...); pass the class itself, e.g. "
            f"inner_optimizer=torch.optim.{type(inner_optimizer).__name__}, and its "
            f"settings as inner_optimizer_kwargs"
        )
    allowed = ", ".join(repr(name) for name in INNER_OPTIMIZERS)
    if isinstance(inner_optimizer, str):
        cls = INNER_OPTIMIZERS.get(inner_optimizer.lower())
        if cls is None:
            raise ValueError(
                f"unknown inner_optimizer {inner_optimizer!r}; choose one of {allowed}"
            )
    elif isinstance(inner_optimizer, type) and inner_optimizer in INNER_OPTIMIZERS.values():
        cls = inner_optimizer
    else:
        raise ValueError(
            f"inner_optimizer {inner_optimizer!r} is not supported: it needs a differentiable "
            f"version that follows it step for step. Choose one of {allowed} "
            f"(or the matching torch.optim class)"
        )

    kwargs = dict(inner_optimizer_kwargs or {})
    bad = sorted(set(kwargs) & _NEVER_ALLOWED)
    if "lr" in bad:
        raise ValueError(
            "inner_optimizer_kwargs must not contain 'lr': the inner learning rate is the "
            "learner's inner_lr argument"
        )
    if bad:
        raise ValueError(
            f"inner_optimizer_kwargs {bad} are not supported in a differentiable inner loop; "
            f"remove them"
        )
    allowed_kwargs = _FUNCTIONAL_KWARGS.get(cls)
    if allowed_kwargs is not None and set(kwargs) - allowed_kwargs:
        unknown = sorted(set(kwargs) - allowed_kwargs)
        raise ValueError(
            f"inner_optimizer_kwargs {unknown} are not settings of {cls.__name__}; "
            f"allowed: {sorted(allowed_kwargs)}"
        )
    spec = InnerOptimizer(cls, kwargs)
    try:
        spec.settings  # noqa: B018 - builds a torch.optim instance, which validates the values
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"inner_optimizer_kwargs={kwargs!r} rejected by torch.optim.{cls.__name__}: {error}"
        ) from error
    return spec


# --------------------------------------------------------------------------- update rules
# Each rule takes one parameter, its gradient and its state dict, and returns
# the new parameter and the new state. ``lr`` may be a tensor (Meta-SGD's
# learned per-parameter rates).


def _scaled_step(param: Tensor, lr: float | Tensor, direction: Tensor) -> Tensor:
    """``param - lr * direction`` computed as ``torch.optim`` does for a float ``lr``."""
    if isinstance(lr, Tensor):
        return param - lr * direction
    return torch.add(param, direction, alpha=-lr)


def sgd_update(
    param: Tensor,
    grad: Tensor,
    state: Mapping[str, Any],
    *,
    lr: float | Tensor,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> tuple[Tensor, dict[str, Any]]:
    """One ``torch.optim.SGD`` step: ``θ ← θ − lr · (g + wd·θ)`` with optional momentum."""
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    new_state: dict[str, Any] = {}
    if momentum != 0:
        buf = state.get("momentum_buffer")
        buf = grad if buf is None else buf.mul(momentum).add(grad, alpha=1 - dampening)
        new_state["momentum_buffer"] = buf
        grad = grad.add(buf, alpha=momentum) if nesterov else buf
    return _scaled_step(param, lr, grad), new_state


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt`` whose derivative at 0 is 0 instead of inf.

    Adam's second moment is exactly zero wherever a gradient is (dead ReLU units,
    unused inputs); the plain derivative there is inf, and inf · 0 = nan poisons
    second-order meta-gradients. The forward value equals ``torch.sqrt``.
    """
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), 0.0)


def adam_update(
    param: Tensor,
    grad: Tensor,
    state: Mapping[str, Any],
    *,
    lr: float | Tensor,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    decoupled_weight_decay: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    """One ``torch.optim.Adam`` step (``AdamW`` with ``decoupled_weight_decay=True``).

    ``m ← lerp(m, g, 1−β1)``, ``v ← β2·v + (1−β2)·g²``,
    ``θ ← θ − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε)``.
    """
    beta1, beta2 = betas
    step = int(state.get("step", 0)) + 1
    if weight_decay != 0:
        if decoupled_weight_decay:
            param = param * (1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    exp_avg = state.get("exp_avg")
    exp_avg_sq = state.get("exp_avg_sq")
    if exp_avg is None or exp_avg_sq is None:
        exp_avg = torch.zeros_like(param)
        exp_avg_sq = torch.zeros_like(param)
    exp_avg = torch.lerp(exp_avg, grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq.mul(beta2).addcmul(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    new_state: dict[str, Any] = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    second_moment = exp_avg_sq
    if amsgrad:
        previous_max = state.get("max_exp_avg_sq")
        if previous_max is not None:
            second_moment = torch.maximum(previous_max, exp_avg_sq)
        new_state["max_exp_avg_sq"] = second_moment
    denom = (_safe_sqrt(second_moment) / bias_correction2_sqrt).add(eps)
    direction = exp_avg / denom
    return _scaled_step(param, lr / bias_correction1, direction), new_state


Params = dict[str, Tensor]
Rates = Mapping[str, "float | Tensor"]


class UpdateRule:
    """An inner update rule: pure functions of explicit, typed state.

    ``state = rule.init(params)``, then per inner step
    ``params, state = rule.update(params, grads, state, rates)``, where ``rates`` maps each
    parameter name to its learning rate for this step (a float, or a tensor: Meta-SGD's
    and MAML++'s learned rates). Every engine runs the same rule, so the vectorised and
    the per-task engines take the same steps; the result stays differentiable with respect
    to the parameters, the gradients and the rates.
    """

    name = "rule"

    def init(self, params: Params) -> Any:
        raise NotImplementedError

    def update(self, params: Params, grads: Params, state: Any, rates: Rates
               ) -> tuple[Params, Any]:
        raise NotImplementedError


class SGDState(NamedTuple):
    """Momentum buffers by parameter name (empty before the first step or without momentum)."""

    momentum: dict[str, Tensor]


class AdamState(NamedTuple):
    """Step count and moment estimates by parameter name (empty before the first step)."""

    step: int
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    max_exp_avg_sq: dict[str, Tensor]


@dataclass(frozen=True)
class SGD(UpdateRule):
    """``torch.optim.SGD``'s rule: ``θ ← θ − lr · (g + wd·θ)``, optional (Nesterov) momentum."""

    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    name = "sgd"

    def init(self, params: Params) -> SGDState:
        return SGDState({})

    def update(self, params: Params, grads: Params, state: SGDState, rates: Rates
               ) -> tuple[Params, SGDState]:
        if self.momentum == 0 and self.weight_decay == 0:  # plain SGD: θ − lr·g, no state
            return {name: _scaled_step(param, rates[name], grads[name])
                    for name, param in params.items()}, state
        new, buffers = {}, {}
        for name, param in params.items():
            previous = state.momentum.get(name)
            new[name], step_state = sgd_update(
                param, grads[name], {} if previous is None else {"momentum_buffer": previous},
                lr=rates[name], momentum=self.momentum, dampening=self.dampening,
                nesterov=self.nesterov, weight_decay=self.weight_decay)
            if "momentum_buffer" in step_state:
                buffers[name] = step_state["momentum_buffer"]
        return new, SGDState(buffers)


@dataclass(frozen=True)
class Adam(UpdateRule):
    """``torch.optim.Adam``'s rule (``AdamW``'s with ``decoupled_weight_decay=True``)."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    decoupled_weight_decay: bool = False
    name = "adam"

    def init(self, params: Params) -> AdamState:
        return AdamState(0, {}, {}, {})

    def update(self, params: Params, grads: Params, state: AdamState, rates: Rates
               ) -> tuple[Params, AdamState]:
        new: Params = {}
        moments: tuple[Params, Params, Params] = ({}, {}, {})
        for name, param in params.items():
            previous: dict[str, Any] = {"step": state.step}
            for key, store in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), state[1:]):
                if name in store:
                    previous[key] = store[name]
            new[name], step_state = adam_update(
                param, grads[name], previous, lr=rates[name], betas=self.betas, eps=self.eps,
                weight_decay=self.weight_decay, amsgrad=self.amsgrad,
                decoupled_weight_decay=self.decoupled_weight_decay)
            for key, store in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), moments):
                if key in step_state:
                    store[name] = step_state[key]
        return new, AdamState(state.step + 1, *moments)
