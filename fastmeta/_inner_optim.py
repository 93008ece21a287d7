"""Inner-loop optimisers: resolving the user's choice, and pure update rules.

The update rules follow ``torch.optim`` step for step (same operations, same
order), but return new tensors instead of writing in place, so they can be
differentiated through (second-order MAML) and vectorised with ``torch.func``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

# Optimisers fastmeta runs in the inner loop, by the name users may pass.
# SGD, Adam and AdamW have fastmeta's own functional rules (below); the others
# are run by higher's differentiable optimisers.
INNER_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
    "adamax": torch.optim.Adamax,
    "asgd": torch.optim.ASGD,
    "rmsprop": torch.optim.RMSprop,
    "rprop": torch.optim.Rprop,
}

# Keyword arguments of the functional rules; anything else (maximize, foreach,
# fused, capturable, ...) would be silently ignored by a differentiable inner
# loop, so it is rejected instead.
_FUNCTIONAL_KWARGS: dict[type[torch.optim.Optimizer], frozenset[str]] = {
    torch.optim.SGD: frozenset({"momentum", "dampening", "nesterov", "weight_decay"}),
    torch.optim.Adam: frozenset({"betas", "eps", "weight_decay", "amsgrad"}),
    torch.optim.AdamW: frozenset({"betas", "eps", "weight_decay", "amsgrad"}),
}
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
        """Whether fastmeta has its own functional rule for it (SGD, Adam, AdamW)."""
        return self.cls in _FUNCTIONAL_KWARGS

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


def functional_update(
    optimizer: InnerOptimizer,
    param: Tensor,
    grad: Tensor,
    state: Mapping[str, Any],
    lr: float | Tensor,
) -> tuple[Tensor, dict[str, Any]]:
    """One step of ``optimizer``'s rule with its full settings."""
    settings = optimizer.settings
    if optimizer.cls is torch.optim.SGD:
        return sgd_update(
            param,
            grad,
            state,
            lr=lr,
            momentum=settings["momentum"],
            dampening=settings["dampening"],
            nesterov=settings["nesterov"],
            weight_decay=settings["weight_decay"],
        )
    if optimizer.cls in (torch.optim.Adam, torch.optim.AdamW):
        return adam_update(
            param,
            grad,
            state,
            lr=lr,
            betas=tuple(settings["betas"]),
            eps=settings["eps"],
            weight_decay=settings["weight_decay"],
            amsgrad=settings["amsgrad"],
            decoupled_weight_decay=optimizer.cls is torch.optim.AdamW,
        )
    raise ValueError(f"no functional rule for inner optimizer {optimizer.name!r}")
