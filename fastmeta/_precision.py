"""Mixed precision of a learner: autocast through both loops, fp32 master weights.

``precision="bf16"`` or ``"fp16"`` runs the model's forward passes (every inner step's
support loss and its gradient, and the query loss) under :func:`torch.autocast` on the
model's device, while the meta-parameters, the fast weights and the gradients stay in
float32: autocast casts a copy of each weight to the lower precision inside the ops that
profit from it (matrix products, convolutions) and keeps losses and reductions in float32.

float16's range is small (the largest value is 65504), so ``"fp16"`` also scales the
outer loss, as :class:`torch.amp.GradScaler` does: the query loss is multiplied by a
dynamic scale before the meta-gradient is computed, the gradient divided by it after.
A meta-step whose meta-gradient or losses are not finite (a float16 overflow in the
inner loop or in the backward pass) is skipped: the meta-parameters are left as they
were, the scale is halved, and :attr:`MetaStepResult.skipped` says so. After
:data:`MAX_SKIPPED_IN_A_ROW` skipped steps in a row the learner gives up with
:class:`fastmeta.DivergenceError`, as in float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .engines import MetaLosses, OuterObjective

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}

# Skipped fp16 meta-steps in a row after which training is called divergent: the scale
# has then been halved as often, so an overflow that scaling can cure is long cured.
MAX_SKIPPED_IN_A_ROW = 20


def check_precision(precision: object) -> str:
    """The canonical name (``"fp32"``, ``"bf16"``, ``"fp16"``) of ``precision``.

    Accepts those names, ``"float32"``/``"bfloat16"``/``"float16"`` and the torch dtypes.

    Raises:
        ValueError: anything else; the message lists the choices.
    """
    if isinstance(precision, torch.dtype):
        for name, dtype in DTYPES.items():
            if dtype == precision:
                return name
    elif isinstance(precision, str):
        name = _ALIASES.get(precision.lower(), precision.lower())
        if name in PRECISIONS:
            return name
    raise ValueError(
        f"precision must be one of {', '.join(repr(p) for p in PRECISIONS)} (or "
        f"torch.float32, torch.bfloat16, torch.float16), got {precision!r}"
    )


def autocast(precision: str, device: torch.device | Callable[[], torch.device]
             ) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of ``precision`` on ``device`` (nothing for ``"fp32"``);
    ``device`` may be a function giving it, asked only when needed."""
    if precision == "fp32":
        return contextlib.nullcontext()
    where = device if isinstance(device, torch.device) else device()
    return torch.autocast(where.type, dtype=DTYPES[precision])


@dataclass(frozen=True)
class ScaledLoss:
    """``loss_fn(prediction, target) · scale``: the outer loss of an fp16 meta-step.

    ``scale`` is read from :class:`LossScaler` at every call (a 0-dim tensor updated in
    place), so one object serves every step, compiled steps included.
    """

    loss_fn: Callable[[Any, Any], Tensor]
    scaler: LossScaler

    def __call__(self, prediction: Any, target: Any) -> Tensor:
        return self.loss_fn(prediction, target).float() * self.scaler.scale


@dataclass(eq=False)
class LossScaler:
    """Dynamic loss scale of fp16 meta-steps, as :class:`torch.amp.GradScaler` keeps it.

    Attributes:
        init_scale: the first scale (``GradScaler``'s default).
        scale: the current scale (a 0-dim float32 tensor on the model's device).
        growth_interval: finite steps in a row after which the scale doubles.
        skipped: meta-steps skipped so far; ``skipped_in_a_row`` those since the last
            finite one.
    """

    init_scale: float = 2.0**16
    growth_interval: int = 2000
    scale: Tensor = dataclasses.field(init=False)
    good_steps: int = 0
    skipped: int = 0
    skipped_in_a_row: int = 0
    # Whether the outer loss of the step in progress was scaled (learners that compute
    # their own meta-gradient, such as Reptile's pseudo-gradient, have no outer loss).
    applied: bool = False
    # Set by :func:`scaling` around the meta-gradient of ``meta_step``.
    active: bool = False

    def __post_init__(self) -> None:
        self.scale = torch.tensor(float(self.init_scale))

    def wrap(self, outer: OuterObjective, device: torch.device) -> OuterObjective:
        """``outer`` with its loss multiplied by the scale (kept on ``device``)."""
        if self.scale.device != device:
            self.scale = self.scale.to(device)
        self.applied = True
        if isinstance(outer.loss_fn, ScaledLoss):
            return outer
        return dataclasses.replace(outer, loss_fn=ScaledLoss(outer.loss_fn, self))

    def unscale(self, grads: Iterable[Tensor], output: MetaLosses) -> tuple[MetaLosses, bool]:
        """Divide the gradients (in place) and query losses by the scale if the step's
        outer loss was scaled, update the scale, and say whether to skip the step: its
        meta-gradient or losses are not finite, and :attr:`gives_up` is still false."""
        query = output.query_losses.detach().clone()
        inverse = self.scale.reciprocal() if self.applied else None
        self.applied = False
        finite = unscale_and_check([*grads, query, output.support_losses], inverse)
        output = MetaLosses(query, output.support_losses)
        if finite:
            self.skipped_in_a_row = 0
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale.mul_(2.0)
                self.good_steps = 0
        else:
            self.skipped += 1
            self.skipped_in_a_row += 1
            self.good_steps = 0
            self.scale.mul_(0.5)
        return output, not finite and not self.gives_up

    @property
    def gives_up(self) -> bool:
        """Whether so many steps in a row were skipped that the run is divergent."""
        return self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW


_ONES: dict[torch.device, Tensor] = {}


def _one(device: torch.device) -> Tensor:
    """A float32 ``[1.0]`` on ``device``, made once (the fused check's unit scale; the
    kernel only reads it)."""
    one = _ONES.get(device)
    if one is None:
        with torch.inference_mode(False):  # an ordinary tensor, whatever mode makes it
            one = _ONES[device] = torch.ones(1, device=device)
    return one


def unscale_and_check(tensors: Sequence[Tensor], inverse: Tensor | None = None) -> bool:
    """Multiply ``tensors`` in place by ``inverse`` (if given) and say whether every entry
    of every one is finite.

    A fused call (``torch._amp_foreach_non_finite_check_and_unscale_``, what
    :class:`torch.amp.GradScaler` runs) checks each entry, so finite tensors whose sum
    would overflow pass: one over the whole list where the kernel takes it, otherwise one
    per device and dtype; one host sync per device reads the verdict.
    """
    if inverse is None and tensors:
        # The common case, floating tensors on one device (any dtypes): one call over the
        # whole list; integer tensors or several devices make the kernel refuse before it
        # reads anything, and the grouped path below takes them.
        device = tensors[0].device
        found_inf = torch.zeros(1, device=device)
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(
                list(tensors), found_inf, _one(device))
        except (RuntimeError, NotImplementedError):
            pass
        else:
            return not bool(found_inf)
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    others = []
    for t in tensors:
        if not t.numel():
            continue
        if t.is_floating_point():
            groups.setdefault((t.device, t.dtype), []).append(t)
        else:
            others.append(t)
    found: dict[torch.device, Tensor] = {}
    for (device, _), group in groups.items():
        if device not in found:
            found[device] = torch.zeros(1, device=device)
        scale = (_one(device) if inverse is None
                 else inverse.reshape(1).to(device=device, dtype=torch.float32))
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(group, found[device], scale)
        except (RuntimeError, NotImplementedError):  # a backend without the fused kernel
            for t in group:
                found[device] += (~torch.isfinite(t)).any()
                if inverse is not None:
                    t.mul_(scale.to(t.dtype))
    if any(bool(flag) for flag in found.values()):
        return False
    return all(bool(torch.isfinite(t).all()) for t in others)


def scaling(scaler: LossScaler | None) -> contextlib.AbstractContextManager[None]:
    """While the block runs, the learner's meta-gradient scales its outer loss."""
    return contextlib.nullcontext() if scaler is None else _scaling(scaler)


@contextlib.contextmanager
def _scaling(scaler: LossScaler) -> Iterator[None]:
    scaler.active = True
    try:
        yield
    finally:
        scaler.active = False
