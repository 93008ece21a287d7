"""Check a learner's meta-gradient on the user's own model, in float64.

Two independent checks of the meta-gradient that ``meta_step`` writes into ``.grad``:

- against a per-task unrolled reference: the same meta-loss run by the per-task loop
  engine (``functional_call`` and autograd, one task at a time) and differentiated by
  ``torch.autograd.grad``, compared on every element;
- against finite differences of the meta-loss, on sampled elements, at several step sizes.

Central differences step across the kinks of ReLU and max-pooling (and, through the inner
loop's gradient, across jumps of the meta-loss), so they can disagree with a correct
meta-gradient. An element that only one-sided differences (from the side the kink is not
on) reproduce, in a model that ran such operations, is counted as a *kink*: the verdict is
then "inconclusive: non-smooth model", not a mismatch. Any other disagreement, with the
reference or with every difference, is a mismatch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ._learner import MetaLearner
from ._task import TaskBatch, as_task
from ._tree import tree_map
from .engines import LoopEngine

# Operations whose derivative jumps: finite differences across them are not derivatives.
NON_SMOOTH_OPS = frozenset({
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "hardtanh", "hardtanh_",
    "threshold", "threshold_", "rrelu", "hardswish", "hardsigmoid", "hardshrink",
    "softshrink", "prelu", "abs", "abs_", "absolute", "clamp", "clamp_", "clip", "clip_",
    "clamp_min", "clamp_max", "maximum", "minimum", "max", "min", "amax", "amin", "fmax",
    "fmin", "sign", "sgn", "round", "floor", "ceil", "trunc", "sort", "topk", "median",
    "kthvalue", "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "adaptive_max_pool1d_with_indices",
    "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices",
    "fractional_max_pool2d", "fractional_max_pool3d", "l1_loss", "smooth_l1_loss",
    "huber_loss", "multi_margin_loss", "hinge_embedding_loss", "margin_ranking_loss",
})

VERDICTS = ("ok", "inconclusive", "mismatch")


class _OpRecorder(TorchFunctionMode):
    """Records the names of the non-smooth torch functions called while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.found: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "").lstrip("_")
        if name in NON_SMOOTH_OPS:
            self.found.add(name.rstrip("_"))
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class GradcheckReport:
    """How the analytic meta-gradient compares with a reference loop and finite differences.

    The relative error of an element is ``|analytic − other| / max(|analytic|, |other|,
    atol / tolerance)``: gradients smaller than ``atol / tolerance`` (zero up to rounding,
    e.g. a conv bias right before BatchNorm) are judged by their absolute error.

    Attributes:
        errors: ``{name: worst relative error}`` against central finite differences (the
            best of the step sizes, per element) over the checked elements.
        checked: ``{name: number of elements checked}`` by finite differences.
        tolerance: the threshold of every comparison.
        reference_errors: ``{name: worst relative error}`` against the per-task unrolled
            reference over every element; empty when the meta-loss is random (dropout),
            as the two engines draw different masks.
        kinks: ``{name: elements}`` that only one-sided differences reproduce, in a model
            that ran non-smooth operations.
        non_smooth: the non-smooth operations the meta-loss ran (``("max_pool2d",
            "relu")``), found only when central differences disagreed somewhere.
        steps: the finite-difference step sizes tried.
    """

    errors: dict[str, float]
    checked: dict[str, int]
    tolerance: float
    reference_errors: dict[str, float] = field(default_factory=dict)
    kinks: dict[str, int] = field(default_factory=dict)
    non_smooth: tuple[str, ...] = ()
    steps: tuple[float, ...] = ()
    mismatched: dict[str, int] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        """Worst relative error against central finite differences, over all parameters."""
        return max(self.errors.values(), default=0.0)

    @property
    def max_reference_error(self) -> float:
        """Worst relative error against the per-task unrolled reference."""
        return max(self.reference_errors.values(), default=0.0)

    @property
    def verdict(self) -> str:
        """``"mismatch"`` (a defect), ``"inconclusive"`` (kinks only) or ``"ok"``."""
        if self.max_reference_error > self.tolerance or any(self.mismatched.values()):
            return "mismatch"
        return "inconclusive" if any(self.kinks.values()) else "ok"

    @property
    def ok(self) -> bool:
        """Every check agrees: the reference loop and central differences at some step."""
        return self.verdict == "ok"

    @property
    def mismatch(self) -> bool:
        """The meta-gradient disagrees with the reference, or with every finite difference
        in a way no kink explains."""
        return self.verdict == "mismatch"

    def __str__(self) -> str:
        width = max((len(name) for name in self.errors), default=4)
        lines = [f"{'parameter':<{width}}  checked  vs reference  vs finite diff.  kinks"]
        for name, error in self.errors.items():
            reference = self.reference_errors.get(name)
            ref_text = "-" if reference is None else f"{reference:.2e}"
            flag = ""
            if (reference or 0.0) > self.tolerance or self.mismatched.get(name):
                flag = "  <-- mismatch"
            elif self.kinks.get(name):
                flag = "  <-- kinks"
            lines.append(f"{name:<{width}}  {self.checked[name]:>7}  {ref_text:>12}  "
                         f"{error:>15.2e}  {self.kinks.get(name, 0):>5}{flag}")
        verdict = self.verdict
        if verdict == "ok":
            lines.append(f"OK: max {self.max_error:.2e} against finite differences, "
                         f"{self.max_reference_error:.2e} against the per-task reference "
                         f"(tolerance {self.tolerance:.0e})")
        elif verdict == "inconclusive":
            lines.append(
                f"INCONCLUSIVE: non-smooth model ({', '.join(self.non_smooth)}): for "
                f"{sum(self.kinks.values())} element(s) central differences step across a "
                f"kink and only one-sided differences agree; the per-task reference agrees "
                f"to {self.max_reference_error:.2e} (tolerance {self.tolerance:.0e})")
        else:
            where = []
            if self.max_reference_error > self.tolerance:
                where.append(f"{self.max_reference_error:.2e} against the per-task reference")
            if any(self.mismatched.values()):
                where.append(f"{sum(self.mismatched.values())} element(s) against every "
                             f"finite difference (max {self.max_error:.2e})")
            lines.append(f"MISMATCH: {'; '.join(where)} (tolerance {self.tolerance:.0e})")
        return "\n".join(lines)


def _relative(a: Tensor | float, b: Tensor | float, floor: float) -> Tensor:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = torch.maximum(torch.maximum(a.abs(), b.abs()), torch.tensor(floor, dtype=a.dtype))
    return (a - b).abs() / scale


def _float64_copy(learner: MetaLearner) -> MetaLearner:
    clone = copy.deepcopy(learner).double()
    clone.engine_tuning = False  # no timing of candidate engines inside a check
    for p in clone.parameters():
        p.grad = None
    return clone


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
    """Check the learner's meta-gradient against a per-task reference and finite differences.

    Works on float64 deep copies of the learner: the learner and its model keep their
    dtype, parameters and gradients. The analytic meta-gradient is what ``meta_step``
    writes into ``.grad`` (the learner's own engine). It is compared, on every element,
    with the gradient of the same meta-loss run one task at a time by the loop engine, and,
    on ``max_elements`` sampled elements per parameter, with central differences at the
    steps ``eps``, ``10·eps`` and ``eps/10`` (an element passes at any of them). Where none
    agrees and the model ran non-smooth operations (ReLU, max-pooling, ...), one-sided
    differences (Richardson-extrapolated, steps ``eps`` and ``eps/10``) from either side
    decide: an element one of them reproduces sits near a kink. Each evaluation of the
    meta-loss runs under the same random seed, so dropout is replayed identically.

    Args:
        learner: a learner with an exact meta-gradient (second-order MAML, Meta-SGD, ANIL).
        batch: the tasks to evaluate the meta-loss on (keep it small).
        eps: the base finite-difference step.
        max_elements: elements checked per parameter (chosen at random when larger).
        tolerance: relative error above which a comparison fails.
        atol: absolute error accepted on gradients that are zero up to rounding.
        seed: seed of the element choice and of every meta-loss evaluation.

    Returns:
        A :class:`GradcheckReport`: ``report.verdict`` is ``"ok"``, ``"inconclusive"``
        (only kinks of a non-smooth model disagree) or ``"mismatch"``; ``print(report)``
        shows the table.

    Raises:
        ValueError: the learner's meta-gradient is first-order (an approximation by design)
            or not a gradient at all (Reptile), or ``eps``/``tolerance`` is not positive.

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
    for name, value in (("eps", eps), ("tolerance", tolerance)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}; e.g. "
                             f"{name}={1e-6 if name == 'eps' else 1e-5}")
    analytic_learner = _float64_copy(learner)
    reference_learner = _float64_copy(learner)
    reference_learner._engine = LoopEngine()  # the per-task unrolled loop
    task = TaskBatch(*(
        tree_map(lambda v: v.double() if v.is_floating_point() else v, t)
        for t in as_task(batch)))

    def seeded(compute: Callable[[], Tensor], at: int = seed) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(at)
            return compute()

    def meta_loss() -> float:
        return float(seeded(lambda: analytic_learner.meta_loss(task).detach()))

    # What meta_step writes into .grad.
    base = meta_loss()  # also lets engine="auto" settle, as meta_step would
    seeded(lambda: analytic_learner.meta_gradient(analytic_learner.prepare(task)).query_losses)
    named = [(n, p) for n, p in analytic_learner.named_parameters() if p.requires_grad]
    analytic = {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                for n, p in named}
    floor = atol / tolerance
    reference_errors = _against_reference(reference_learner, task, analytic, seeded, floor)

    generator = torch.Generator().manual_seed(seed)
    errors: dict[str, float] = {}
    checked: dict[str, int] = {}
    kinks: dict[str, int] = {}
    mismatched: dict[str, int] = {}
    non_smooth: tuple[str, ...] | None = None
    central_steps = (eps, 10 * eps, eps / 10)
    for name, param in named:
        flat_grad = analytic[name].flatten()
        count = min(max_elements, param.numel())
        elements = torch.randperm(param.numel(), generator=generator)[:count]
        flat = param.data.view(-1)
        worst, kinks[name], mismatched[name] = 0.0, 0, 0

        def at(element: int, offset: float, flat: Tensor = flat) -> float:
            original = float(flat[element])
            flat[element] = original + offset
            try:
                return meta_loss()
            finally:
                flat[element] = original

        for element in elements.tolist():
            exact = float(flat_grad[element])
            best = math.inf
            for h in central_steps:
                numeric = (at(element, h) - at(element, -h)) / (2 * h)
                best = min(best, float(_relative(exact, numeric, floor)))
                if best <= tolerance:
                    break
            worst = max(worst, best)
            if best <= tolerance:
                continue
            if non_smooth is None:
                non_smooth = _non_smooth_ops(analytic_learner, task, seeded)
            if non_smooth and _one_sided_agrees(at, element, base, exact, (eps, eps / 10),
                                                floor, tolerance):
                kinks[name] += 1
            else:
                mismatched[name] += 1
        errors[name] = worst
        checked[name] = count
    return GradcheckReport(
        errors=errors, checked=checked, tolerance=tolerance,
        reference_errors=reference_errors, kinks=kinks, non_smooth=non_smooth or (),
        steps=central_steps, mismatched=mismatched)


def _against_reference(
    reference: MetaLearner, task: TaskBatch, analytic: dict[str, Tensor],
    seeded: Callable[..., Tensor], floor: float,
) -> dict[str, float]:
    """Worst relative error of ``analytic`` against the loop engine's meta-gradient, or
    ``{}`` when the meta-loss is random (two seeds give two values)."""
    loss = seeded(lambda: reference.meta_loss(task))
    other = float(seeded(lambda: reference.meta_loss(task).detach(), 1 + 2**20))
    if not math.isclose(float(loss.detach()), other, rel_tol=1e-12, abs_tol=0.0):
        return {}
    params = dict(reference.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in analytic], allow_unused=True)
    return {
        name: float(_relative(a, torch.zeros_like(a) if g is None else g, floor).max())
        if a.numel() else 0.0
        for (name, a), g in zip(analytic.items(), grads)
    }


def _non_smooth_ops(learner: MetaLearner, task: TaskBatch,
                    seeded: Callable[..., Tensor]) -> tuple[str, ...]:
    """The non-smooth torch functions one evaluation of the meta-loss calls."""
    recorder = _OpRecorder()
    with recorder:
        seeded(lambda: learner.meta_loss(task).detach())
    return tuple(sorted(recorder.found))


def _one_sided_agrees(
    at: Callable[[int, float], float], element: int, base: float, exact: float,
    steps: tuple[float, ...], floor: float, tolerance: float,
) -> bool:
    """Whether a one-sided, Richardson-extrapolated difference (error O(h²)) from either
    side reproduces ``exact``: the side without the kink gives the derivative there."""
    for h in steps:
        for side in (1.0, -1.0):
            near, far = at(element, side * h), at(element, side * 2 * h)
            numeric = side * (4 * near - far - 3 * base) / (2 * h)
            if float(_relative(exact, numeric, floor)) <= tolerance:
                return True
    return False
