"""Check a learner's meta-gradient on the user's own model against finite differences."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._learner import MetaLearner
from ._task import TaskBatch, as_task
from ._tree import tree_map


@dataclass(frozen=True)
class GradcheckReport:
    """Worst relative error of the analytic meta-gradient, per meta-parameter.

    The relative error of an element is ``|analytic − numeric| / max(|analytic|, |numeric|,
    atol / tolerance)``: gradients smaller than ``atol / tolerance`` (zero up to rounding,
    e.g. a conv bias right before BatchNorm) are judged by their absolute error.

    Attributes:
        errors: ``{name: worst relative error}`` over the checked elements.
        checked: ``{name: number of elements checked}``.
        tolerance: the threshold used for :attr:`ok`.
    """

    errors: dict[str, float]
    checked: dict[str, int]
    tolerance: float

    @property
    def max_error(self) -> float:
        """Worst relative error over all parameters."""
        return max(self.errors.values(), default=0.0)

    @property
    def ok(self) -> bool:
        """Whether every error is below the tolerance."""
        return self.max_error <= self.tolerance

    def __str__(self) -> str:
        width = max((len(name) for name in self.errors), default=4)
        lines = [f"{'parameter':<{width}}  checked  worst rel. error"]
        for name, error in self.errors.items():
            flag = "" if error <= self.tolerance else "  <-- above tolerance"
            lines.append(f"{name:<{width}}  {self.checked[name]:>7}  {error:.2e}{flag}")
        verdict = "OK" if self.ok else "MISMATCH"
        lines.append(f"{verdict}: max {self.max_error:.2e} (tolerance {self.tolerance:.0e})")
        return "\n".join(lines)


def gradcheck(
    learner: MetaLearner,
    batch: TaskBatch | Mapping[str, Any],
    *,
    eps: float = 1e-6,
    max_elements: int = 20,
    tolerance: float = 1e-5,
    atol: float = 1e-8,
    seed: int = 0,
) -> GradcheckReport:
    """Compare the learner's meta-gradient with central finite differences, in float64.

    Works on a float64 deep copy of the learner: the learner and its model keep their
    dtype, parameters and gradients. Each evaluation of the meta-loss runs under the
    same random seed, so dropout is replayed identically.

    Args:
        learner: a learner with an exact meta-gradient (second-order MAML, Meta-SGD, ANIL).
        batch: the tasks to evaluate the meta-loss on (keep it small).
        eps: finite-difference step.
        max_elements: elements checked per parameter (chosen at random when larger).
        tolerance: relative error above which :attr:`GradcheckReport.ok` is false.
        atol: absolute error accepted on gradients that are zero up to rounding.
        seed: seed of the element choice and of every meta-loss evaluation.

    Returns:
        A :class:`GradcheckReport`; ``print(report)`` shows the table.

    Raises:
        ValueError: the learner's meta-gradient is first-order (an approximation by design)
            or not a gradient at all (Reptile).

    Example:
        >>> report = fastmeta.gradcheck(fastmeta.MAML(model, inner_lr=0.01), batch)
        >>> print(report); assert report.ok
    """
    if learner.first_order:
        raise ValueError(
            f"gradcheck checks exact meta-gradients, but this {type(learner).__name__} is "
            f"first-order (its meta-gradient ignores second derivatives by design). Check "
            f"the same model with first_order=False, e.g. fastmeta.MAML(model, ...)"
        )
    reference = copy.deepcopy(learner).double()
    task = TaskBatch(*(
        tree_map(lambda v: v.double() if v.is_floating_point() else v, t)
        for t in as_task(batch)))

    def meta_loss() -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return reference.meta_loss(task).detach()

    named = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loss = reference.meta_loss(task)
    analytic = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    generator = torch.Generator().manual_seed(seed)
    errors: dict[str, float] = {}
    checked: dict[str, int] = {}
    for (name, param), grad in zip(named, analytic):
        flat_grad = torch.zeros_like(param).flatten() if grad is None else grad.flatten()
        count = min(max_elements, param.numel())
        elements = torch.randperm(param.numel(), generator=generator)[:count]
        worst = 0.0
        flat = param.data.view(-1)
        for element in elements.tolist():
            original = float(flat[element])
            flat[element] = original + eps
            plus = float(meta_loss())
            flat[element] = original - eps
            minus = float(meta_loss())
            flat[element] = original
            numeric = (plus - minus) / (2 * eps)
            exact = float(flat_grad[element])
            scale = max(abs(numeric), abs(exact), atol / tolerance)
            worst = max(worst, abs(numeric - exact) / scale)
        errors[name] = worst
        checked[name] = count
    return GradcheckReport(errors=errors, checked=checked, tolerance=tolerance)
