"""The named losses: ``"mse"``, ``"l1"``, ``"cross_entropy"``, on the model's raw output.

A :class:`Loss` takes the model's output as it is (a tensor, a tuple, a dict or a Hugging
Face ``ModelOutput``), picks the prediction out of it (:attr:`Loss.output_fn`, or the
common containers), and checks the prediction against the targets before computing: shapes
that would broadcast silently, class labels given to a regression loss, floating labels or
scores without a class dimension for cross-entropy. Label ranges need the values, so the
learner checks them on the whole batch before running the engine (:func:`label_problem`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _mse(prediction: Tensor, target: Tensor) -> Tensor:
    """``F.mse_loss``; under ``torch.func`` transforms from its definition, whose
    derivatives are native ops: torch runs ``mse_loss``'s backward there as a Python
    decomposition, a fixed cost of every inner step of every task (same values)."""
    if torch._C._are_functorch_transforms_active():
        return (prediction - target).square().mean()
    return F.mse_loss(prediction, target)


_FUNCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": _mse,
    "l1": F.l1_loss,
    "cross_entropy": F.cross_entropy,
}
LOSSES = tuple(_FUNCTIONS)
# ``F.cross_entropy``'s default ``ignore_index``: labels with this value are skipped.
IGNORE_INDEX = -100


def prediction_of(output: Any, loss: str = "the loss") -> Tensor:
    """The prediction inside a model's output: the tensor itself, the first element of a
    tuple or list, the ``"logits"`` entry of a dict or ``ModelOutput``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    found = (f"a {type(output).__name__} with keys {list(output.keys())}"
             if isinstance(output, Mapping) else f"a {type(output).__name__}")
    raise TypeError(
        f"{loss} needs a prediction tensor, but the model returned {found}. A tensor, a "
        f"tuple (its first element) or a dict/ModelOutput with a 'logits' entry is read "
        f"directly; otherwise say where the prediction is: "
        f"fastmeta.Loss({loss!r}, output_fn=lambda out: out['prediction'])"
    )


def _shape(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))


def shape_problem(name: str, prediction: tuple[int, ...], prediction_dtype: torch.dtype,
                  target: tuple[int, ...], target_dtype: torch.dtype) -> str | None:
    """What is wrong between a prediction and its targets for the loss ``name``, or None
    (computed once per combination: every meta-step asks again)."""
    key = (name, tuple(prediction), prediction_dtype, tuple(target), target_dtype)
    if torch.compiler.is_compiling():  # no guard on a cache that other calls fill
        return _shape_problem(*key)
    if key not in _PROBLEMS:
        if len(_PROBLEMS) > 4096:
            _PROBLEMS.clear()
        _PROBLEMS[key] = _shape_problem(*key)
    return _PROBLEMS[key]


_PROBLEMS: dict[tuple[Any, ...], str | None] = {}


def _shape_problem(name: str, prediction: tuple[int, ...], prediction_dtype: torch.dtype,
                   target: tuple[int, ...], target_dtype: torch.dtype) -> str | None:
    if name in ("mse", "l1"):
        if not (target_dtype.is_floating_point or target_dtype.is_complex):
            return (
                f"loss_fn={name!r} got targets of dtype {target_dtype}, which look like class "
                f"labels: a regression loss would treat them as numbers. For classification "
                f"pass loss_fn='cross_entropy'; for regression on integer values convert "
                f"them: y.float()"
            )
        if prediction != target:
            fix = "give the targets the prediction's shape"
            if prediction == (*target, 1):
                fix = "add the trailing dimension to the targets: y.unsqueeze(-1)"
            elif target == (*prediction, 1):
                fix = "remove the targets' trailing dimension: y.squeeze(-1)"
            try:
                both = _shape(torch.broadcast_shapes(prediction, target))
                spread = f" (they would broadcast to {both}, mixing up examples)"
            except RuntimeError:
                spread = ""
            return (
                f"loss_fn={name!r}: the prediction has shape {_shape(prediction)} but the "
                f"targets have shape {_shape(target)}{spread}; {fix}"
            )
        return None
    # cross-entropy: scores [examples, classes, ...]
    if len(prediction) < 2:
        return (
            f"loss_fn='cross_entropy' needs class scores of shape [examples, classes], but "
            f"the prediction has shape {_shape(prediction)}; make the model output one score "
            f"per class (e.g. a final nn.Linear(features, num_classes))"
        )
    labels = (prediction[0], *prediction[2:])
    if target_dtype.is_floating_point:
        if target == prediction:
            return None  # class probabilities
        return (
            f"loss_fn='cross_entropy' got floating-point targets of shape {_shape(target)} "
            f"for class scores {_shape(prediction)}: class labels must be integers (convert "
            f"them: y.long()); floating targets are read as class probabilities only with "
            f"the prediction's shape"
        )
    if target_dtype == torch.bool or target_dtype.is_complex:
        return (
            f"loss_fn='cross_entropy' got targets of dtype {target_dtype}; class labels must "
            f"be integers: y.long()"
        )
    if target != labels:
        fix = "give one label per example"
        if target == (*labels, 1):
            fix = "remove the labels' trailing dimension: y.squeeze(-1)"
        return (
            f"loss_fn='cross_entropy': class scores of shape {_shape(prediction)} need labels "
            f"of shape {_shape(labels)}, got {_shape(target)}; {fix}"
        )
    return None


def label_problem(target: Tensor, classes: int) -> tuple[int, int] | None:
    """``(task, label)`` of the first label outside ``[0, classes)`` in ``target``
    (``[tasks, ...]``, ``IGNORE_INDEX`` allowed), or ``None``."""
    flat = target.reshape(target.shape[0], -1)
    bad = ((flat < 0) & (flat != IGNORE_INDEX)) | (flat >= classes)
    if not bool(bad.any()):
        return None
    task = int(bad.any(dim=1).nonzero()[0, 0])
    label = int(flat[task][bad[task]][0])
    return task, label


@dataclass(frozen=True)
class Loss:
    """A named loss on the model's raw output: ``loss(output, target) -> scalar``.

    The prediction is ``output_fn(output)`` if given; otherwise the output itself if it is
    a tensor, its first element if it is a tuple or list, its ``"logits"`` entry if it is a
    dict or ``ModelOutput``. Before computing, the prediction and targets are checked:
    equal shapes for ``"mse"`` and ``"l1"`` (no silent broadcasting), floating-point
    targets for them, and integer labels ``[examples, ...]`` (or class probabilities of the
    prediction's shape) with class scores ``[examples, classes, ...]`` for
    ``"cross_entropy"``.

    Args:
        name: ``"mse"``, ``"l1"`` or ``"cross_entropy"``.
        output_fn: picks the prediction out of the model's output, e.g.
            ``lambda out: out.logits``.

    Example:
        >>> loss = fastmeta.Loss("cross_entropy", output_fn=lambda out: out["scores"])
        >>> learner = fastmeta.MAML(model, inner_lr=0.1, loss_fn=loss)
    """

    name: str
    output_fn: Callable[[Any], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.name not in _FUNCTIONS:
            raise ValueError(f"unknown loss {self.name!r}; choose one of {list(LOSSES)}")
        if self.output_fn is not None and not callable(self.output_fn):
            raise TypeError(
                f"output_fn must be callable (model output) -> prediction tensor, got "
                f"{self.output_fn!r}; e.g. output_fn=lambda out: out.logits"
            )

    def prediction(self, output: Any) -> Tensor:
        """The prediction inside the model's output."""
        if self.output_fn is None:
            return prediction_of(output, self.name)
        prediction = self.output_fn(output)
        if not isinstance(prediction, Tensor):
            raise TypeError(
                f"output_fn must return the prediction tensor, got "
                f"{type(prediction).__name__}"
            )
        return prediction

    def problem(self, prediction: Tensor, target: Any) -> str | None:
        """What is wrong between ``prediction`` and ``target`` (shapes, dtypes), or None."""
        if not isinstance(target, Tensor):
            return (f"loss_fn={self.name!r} needs the targets as one tensor, got "
                    f"{type(target).__name__}; pass a loss_fn(output, target) of your own "
                    f"for structured targets")
        return shape_problem(self.name, tuple(prediction.shape), prediction.dtype,
                             tuple(target.shape), target.dtype)

    def __call__(self, output: Any, target: Any) -> Tensor:
        prediction = self.prediction(output)
        if isinstance(target, Tensor) and not torch.compiler.is_compiling():
            # shapes and dtypes checked once: every inner step of every meta-step repeats them
            key = (self.name, prediction.shape, prediction.dtype, target.shape, target.dtype)
            if key not in _CHECKED:
                self._check(prediction, target)
                _CHECKED.add(key)
        else:
            self._check(prediction, target)
        return _FUNCTIONS[self.name](prediction, target)

    def _check(self, prediction: Tensor, target: Any) -> None:
        problem = self.problem(prediction, target)
        if problem is not None:
            raise ValueError(problem)


# (loss name, prediction shape and dtype, target shape and dtype) found consistent.
_CHECKED: set[tuple[Any, ...]] = set()


def resolve_named(name: str) -> Loss:
    """The :class:`Loss` of a name, with the list of names if it is unknown."""
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown loss_fn {name!r}; choose one of {list(LOSSES)}")
    return Loss(name)
