"""The learner every algorithm builds on: one ``adapt()`` / ``meta_step()`` API."""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ._adapted import AdaptedModel, AdaptedTasks
from ._diagnose import check_outer_lr, explained, non_finite_parameters, refuse_meta_model
from ._example_shape import ExampleShapes, check_batch, check_single_task, support_shapes
from ._inner_optim import InnerOptimizer, resolve_inner_optimizer
from ._losses import Loss, label_problem, resolve_named, shape_problem
from ._objectives import Proximal, SupervisedLoss
from ._precision import LossScaler, autocast, check_precision, scaling, unscale_and_check
from ._selection import Selection, select
from ._structure import structure
from ._task import TaskBatch, as_task, plain_task, shapes_of, single_task, to_model
from ._tree import (
    Tree,
    call,
    describe,
    index,
    leaves,
    tree_map,
)
from .engines import (
    PROBE_STEPS,
    Adaptation,
    AutoEngine,
    Engine,
    EngineDecision,
    InnerLoop,
    InnerObjective,
    InnerRates,
    MetaGrad,
    MetaLosses,
    OuterObjective,
    Params,
    parse_memory_budget,
    resolve_engine,
    smaller_probe,
    without_randomness,
)

LossFn = Callable[[Any, Any], Tensor]

# ``sync(learner, local)`` runs ``local()`` (this process's meta-gradient, written into
# ``.grad``) and returns the losses of the whole meta-batch, with ``.grad`` combined over
# processes. Set by :func:`fastmeta.distributed.data_parallel`.
MetaGradientSync = Callable[["MetaLearner", Callable[[], MetaLosses]], MetaLosses]


@dataclass(frozen=True)
class ConstantRates:
    """``inner_lr`` for every adapted parameter at every inner step."""

    inner_lr: float

    def __call__(self, step: int) -> Mapping[str, float]:
        return _Same(self.inner_lr)


class _Same(Mapping[str, float]):
    """A mapping that gives one value for every key."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __getitem__(self, key: str) -> float:
        return self.value

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


class DivergenceError(FloatingPointError):
    """The meta-loss or meta-gradient became NaN or infinite; the weights were not updated.

    Attributes:
        meta_step: 1-based number of the meta-step that failed.
        task: index of the first task whose inner loop diverged, or ``None``.
        inner_step: 1-based inner step whose support loss was first non-finite, or ``None``.
    """

    def __init__(
        self, message: str, *, meta_step: int, task: int | None, inner_step: int | None
    ) -> None:
        super().__init__(message)
        self.meta_step = meta_step
        self.task = task
        self.inner_step = inner_step


class MetaStepResult:
    """What :meth:`MetaLearner.meta_step` returns.

    The losses stay where the meta-step computed them until they are read: a step whose
    result is not looked at copies nothing to the host (on CUDA, no transfer and no wait
    per step). Each attribute is converted once, on first use.

    Attributes:
        loss: mean query loss over the tasks, after adaptation (the meta-loss), a float.
        task_losses: ``[tasks]`` query loss of each task after adaptation (on the CPU).
        support_losses: ``[tasks, inner_steps]`` inner objective (the support loss) before
            each inner step (on the CPU).
        skipped: with ``precision="fp16"``: the meta-gradient or a loss was not finite
            (a float16 overflow), so the meta-parameters were not updated and the loss
            scale was halved (see :attr:`MetaLearner.precision`).
    """

    __slots__ = ("_loss", "_query", "_task_losses", "_support_losses", "skipped")

    def __init__(self, loss: float | None, task_losses: Tensor, support_losses: Tensor,
                 skipped: bool = False) -> None:
        self._loss: float | None = loss  # None: the mean of task_losses where computed
        self._query: Tensor | None = task_losses
        self._task_losses = task_losses
        self._support_losses = support_losses
        self.skipped = skipped

    @property
    def loss(self) -> float:
        if self._loss is None:
            assert self._query is not None
            self._loss = float(self._query.mean())
            self._query = None
        return self._loss

    @property
    def task_losses(self) -> Tensor:
        self._task_losses = _on_host(self._task_losses)
        return self._task_losses

    @property
    def support_losses(self) -> Tensor:
        self._support_losses = _on_host(self._support_losses)
        return self._support_losses

    @property
    def inner_losses(self) -> Tensor:
        """The former name of :attr:`support_losses`."""
        return self.support_losses

    def __repr__(self) -> str:
        return (f"MetaStepResult(loss={self.loss:.6g}, task_losses=[{self._task_losses.numel()}"
                f"], support_losses={list(self._support_losses.shape)}, "
                f"skipped={self.skipped})")


def _on_host(losses: Tensor) -> Tensor:
    """``losses`` detached and on the CPU (the same tensor where it already is)."""
    if losses.device.type != "cpu" or losses.requires_grad:
        return losses.detach().cpu()
    return losses


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile``d one (same parameters), with a warning."""
    inner = getattr(model, "_orig_mod", None)
    if not isinstance(inner, nn.Module) or type(model).__name__ != "OptimizedModule":
        return model
    warnings.warn(
        "model is a torch.compile'd module; fastmeta meta-learns the module it wraps "
        "(model._orig_mod, the same parameters) because neither engine can run through a "
        "compiled forward. Pass the uncompiled model, and compile=True to compile the "
        "vectorised meta-step instead.",
        UserWarning,
        stacklevel=4,
    )
    return inner


def _check_positive_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def check_steps(name: str, value: object, minimum: int) -> int:
    """Validate an integer count of steps."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def resolve_loss(loss_fn: str | LossFn | None) -> LossFn:
    """``None`` → mean squared error; a name from ``mse``, ``l1``, ``cross_entropy`` (a
    checked :class:`fastmeta.Loss` on the model's raw output); a callable."""
    if loss_fn is None:
        return Loss("mse")
    if isinstance(loss_fn, str):
        return resolve_named(loss_fn)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (prediction, target) -> loss, got {loss_fn!r}")
    return loss_fn


class MetaLearner(ExampleShapes):
    """Base class of all learners: wraps a user's ``nn.Module`` without copying it.

    The learner is itself an ``nn.Module``: ``learner.parameters()`` are the
    meta-parameters (the model's, plus any the algorithm learns, such as Meta-SGD's
    rates), ``learner(x)`` runs the model, and ``state_dict()`` saves everything,
    including ``learner.example_shape``, the shape of one support example (recorded from
    the batches it meets, or set), against which ``adapt`` and ``meta_step`` check that no
    task dimension is missing or extra.

    BatchNorm and other buffers: the inner loop runs on functional copies whose buffers
    are cloned from the model, so ``adapt`` and ``meta_step`` never change the model's
    buffers. A model in train mode normalises with the statistics of each batch (as in
    the MAML reference implementation); a model in eval mode uses its stored statistics.

    Args:
        model: the network to meta-train.
        inner_lr: learning rate of the inner (adaptation) loop.
        inner_steps: number of inner steps in ``meta_step`` and, by default, ``adapt``.
        first_order: treat inner gradients as constants (no second derivatives).
        loss_fn: ``loss_fn(output, target) -> scalar`` for both loops, given the model's
            output as it is; default MSE. Names: ``"mse"``, ``"l1"``, ``"cross_entropy"``
            (a :class:`fastmeta.Loss`: it reads the prediction from a tensor, tuple, dict or
            ``ModelOutput`` and checks shapes, dtypes and label ranges first).
        adapt: the parameters the inner loop adapts (default: every trainable one): names,
            submodule names, glob patterns (``"*.bias"``), submodules, parameters, a
            predicate ``(name, parameter) -> bool``, or a list of these, matched by
            identity (tied weights work). The others are meta-learned but fixed per task.
        inner_optimizer: ``"sgd"`` (default), ``"adam"``, ``"adamw"``, another name from
            ``fastmeta.INNER_OPTIMIZERS``, or the matching ``torch.optim`` class.
        inner_optimizer_kwargs: its settings (``momentum``, ``betas``, ...), without ``lr``.
        engine: ``"auto"`` (default: the vectorised engine where it is exact for the
            model, higher otherwise, with a warning naming the reason), ``"vmap"`` or
            ``"higher"``. See :attr:`engine_decision`.
        compile: ``torch.compile`` the vectorised meta-step (compiled once per input shape;
            falls back to uncompiled with one warning if compiling fails).
        verify_engine: with ``engine="auto"``, compare the vectorised engine with higher
            on a float64 copy of the learner (two tasks) before the first ``adapt`` and
            the first meta-gradient, and keep it only if they agree. Costs one extra
            small computation per kind of call, once; ``False`` skips it.
        memory_budget: the memory a meta-step may add to what is in use: ``"auto"``
            (default: 80% of what the device can still give), bytes, or a size such as
            ``"6GiB"``. ``engine="auto"`` never runs a candidate predicted over it (see
            :attr:`engine_decision`); the other engines ignore it.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the forward passes of
            both loops under ``torch.autocast`` on the model's device, the weights and
            gradients in float32; ``"fp16"`` also scales the outer loss and skips a
            meta-step whose meta-gradient overflows (:attr:`precision`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_lr: float,
        inner_steps: int = 1,
        first_order: bool = False,
        loss_fn: str | LossFn | None = None,
        inner_optimizer: str | type[torch.optim.Optimizer] = "sgd",
        inner_optimizer_kwargs: Mapping[str, Any] | None = None,
        engine: str | Engine = "auto",
        compile: bool = False,
        verify_engine: bool = True,
        memory_budget: int | str = "auto",
        adapt: Selection | None = None,
        precision: str | torch.dtype = "fp32",
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}; wrap a plain "
                f"function in a Module subclass first"
            )
        model = _unwrap_compiled(model)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                "model has no trainable parameters (none with requires_grad=True): there is "
                "nothing to meta-learn"
            )
        refuse_meta_model(model)
        self.module = model
        self._selected: tuple[str, ...] | None = None if adapt is None else select(model, adapt)
        self._example_shapes = None  # one support example's shape per input leaf, once seen
        # Input signature -> (prediction shape after the examples dim, prediction dtype).
        self._output_specs: dict[Any, tuple[tuple[int, ...], torch.dtype] | None] = {}
        # What the last batch that passed prepare()'s checks looked like (shapes_of()).
        self._prepared: Any = None
        # The same for a batch that prepare() returned as given (no move, no cast).
        self._unchanged: Any = None
        self.inner_lr = _check_positive_number("inner_lr", inner_lr)
        self.inner_steps = check_steps("inner_steps", inner_steps, 1)
        self.first_order = bool(first_order)
        self.loss_fn = resolve_loss(loss_fn)
        self.inner_optimizer: InnerOptimizer = resolve_inner_optimizer(
            inner_optimizer, inner_optimizer_kwargs
        )
        self._engine: Engine = resolve_engine(
            engine, model, self.inner_optimizer, compile=bool(compile),
            verify=bool(verify_engine), memory_budget=parse_memory_budget(memory_budget),
        )
        if isinstance(self._engine, AutoEngine):  # a failed meta-step restores their .grad
            self._engine.grads_of = self._parameter_list
        self.meta_steps_taken = 0
        self._warned_optimizer = False
        # The optimiser whose parameter groups were last checked (identity and layout).
        self._checked_optimizer: tuple[int, int, tuple[tuple[int, int], ...]] | None = None
        self._optimizer_outside = True  # whether it holds parameters the learner lacks
        self.meta_gradient_sync: MetaGradientSync | None = None
        self.precision = precision  # validated (and the fp16 loss scaler made) by the setter

    # ------------------------------------------------------------------ hooks for algorithms

    @property
    def engine(self) -> str:
        """Name of the engine that runs the inner loop."""
        return self._engine.name

    @property
    def precision(self) -> str:
        """``"fp32"``, ``"bf16"`` or ``"fp16"``: the autocast precision of both loops.

        The meta-parameters, fast weights and gradients stay float32 (autocast casts
        weights inside the ops that run in the lower precision). ``"fp16"`` scales the
        outer loss dynamically, as ``torch.amp.GradScaler`` does, and a meta-step whose
        meta-gradient or losses overflow is skipped (:attr:`MetaStepResult.skipped`;
        :attr:`skipped_steps` counts them); after ``fastmeta._precision.MAX_SKIPPED_IN_A_ROW``
        skipped steps in a row, :class:`DivergenceError` is raised. Settable.
        """
        return self._precision

    @precision.setter
    def precision(self, value: str | torch.dtype) -> None:
        self._precision = check_precision(value)
        self._loss_scaler = LossScaler() if self._precision == "fp16" else None

    @property
    def skipped_steps(self) -> int:
        """Meta-steps skipped on a float16 overflow (``precision="fp16"``)."""
        return 0 if self._loss_scaler is None else self._loss_scaler.skipped

    @property
    def engine_decision(self) -> EngineDecision:
        """How the engine was chosen: the engine, the reason, the checks and their cost."""
        if isinstance(self._engine, AutoEngine):
            return self._engine.decision
        return EngineDecision(self.engine, "chosen explicitly (engine=...)")

    @property
    def engine_tuning(self) -> bool:
        """Whether ``engine="auto"`` times its exact candidates on the first meta-steps and
        keeps the fastest (the default). Set it to ``False`` before the first meta-step for
        runs that must repeat bit for bit (resumed benchmark runs do): the engines agree to
        rounding, not to the last bit."""
        return isinstance(self._engine, AutoEngine) and self._engine.tune

    @engine_tuning.setter
    def engine_tuning(self, enabled: bool) -> None:
        if isinstance(self._engine, AutoEngine):
            self._engine.tune = bool(enabled)

    def _check_engine(
        self, kind: str, make_task: Callable[[], TaskBatch], *, steps: int | None = None,
        agree: Callable[[int], int] | None = None,
    ) -> None:
        """Before the first call of ``kind``, let ``engine="auto"`` compare its engines."""
        engine = self._engine
        if not isinstance(engine, AutoEngine) or not engine.needs_check(kind) or steps == 0:
            return
        try:
            task: TaskBatch | None = make_task()
        except Exception:
            if agree is None:
                raise
            task = None  # the call reports the error, after the peers have agreed
        engine.check(kind, partial(self._probe, kind, task, steps), agree)

    def _probe(
        self, kind: str, task: TaskBatch | None, steps: int | None, engine: Engine,
        dtype: torch.dtype | None, small: bool = False,
    ) -> dict[str, Tensor]:
        """This learner's computation on a copy of itself, run by ``engine``.

        The copy (in ``dtype`` if given) runs on the first two tasks, without dropout,
        under a fixed seed; the learner, its model and the random-number state are left
        as they were. ``small``: at most :data:`PROBE_STEPS` inner steps, and a query set
        cut to the size of the support set (see :func:`smaller_probe`). Returns the
        adapted weights (``kind="adapt"``) or the meta-gradient.
        """
        if task is None:
            raise ValueError("no task to probe")
        memo = {id(self._engine): engine, id(self.meta_gradient_sync): None}
        clone = copy.deepcopy(self, memo)
        first = TaskBatch(*(index(t, slice(0, 2)) for t in task))
        steps = self.inner_steps if steps is None else steps
        if small:
            first, steps = smaller_probe(first), min(steps, PROBE_STEPS)
            clone.inner_steps = min(clone.inner_steps, PROBE_STEPS)
        if dtype is not None:
            clone = clone.to(dtype)
            first = TaskBatch(*(
                tree_map(lambda v: v.to(dtype) if v.is_floating_point() else v, t)
                for t in first))
        devices = sorted({p.device.index or 0 for p in clone.parameters() if p.is_cuda})
        with torch.random.fork_rng(devices=devices), without_randomness(), \
                warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            if kind == "adapt":
                return clone._adapt(first, steps).params
            clone.zero_grad(set_to_none=True)
            output = clone.meta_gradient(first)
            grads = {n: p.grad for n, p in clone.named_parameters() if p.grad is not None}
            return {**grads, "query losses": output.query_losses.detach()}

    # ------------------------------------------------------------------ the parts an algorithm
    # chooses (override these in a subclass; see docs/contributing.md)

    def adapted_names(self) -> tuple[str, ...]:
        """Names of the model parameters updated in the inner loop: those chosen by
        ``adapt=``, or else every trainable one."""
        if self._selected is not None:
            return self._selected
        return tuple(name for name, p in structure(self.module).named_parameters()
                     if p.requires_grad)

    def inner_objective(self) -> InnerObjective:
        """The loss each inner step descends: ``loss_fn(model(x), y)`` on the support set."""
        return SupervisedLoss(self.loss_fn)

    def inner_rates(self) -> InnerRates:
        """``rates(step)``: the learning rate of each adapted parameter (``inner_lr``)."""
        return ConstantRates(self.inner_lr)

    def support_schedule(self, task: TaskBatch, steps: int) -> Tensor | None:
        """Support minibatch indices ``[tasks, steps, batch]``, or ``None`` (full batch)."""
        return None

    def step_parameters(self) -> Callable[[int], Params] | None:
        """``params(step)``: parameters that replace the model's at an inner step, or ``None``."""
        return None

    def outer_objective(self) -> OuterObjective:
        """The query loss the meta-gradient descends: ``loss_fn`` after the last step."""
        return OuterObjective(self.loss_fn)

    def meta_gradient_order(self) -> MetaGrad:
        """How the meta-gradient sees the inner loop (second or first order)."""
        return MetaGrad.FIRST_ORDER if self.first_order else MetaGrad.SECOND_ORDER

    def inner_loop(self, task: TaskBatch, steps: int) -> InnerLoop:
        """The inner loop of ``steps`` steps for the tasks of ``task``, from the parts above."""
        batch_indices = self.support_schedule(task, steps)
        if batch_indices is not None:
            task.check_per_example("minibatch inner steps (support_schedule)")
        return InnerLoop(
            adapted=self.adapted_names(),
            objective=self.inner_objective(),
            optimizer=self.inner_optimizer,
            rates=self.inner_rates(),
            steps=steps,
            batch_indices=batch_indices,
            step_params=self.step_parameters(),
        )

    def meta_gradient(self, task: TaskBatch) -> MetaLosses:
        """Add this learner's meta-gradient on ``task`` to ``.grad``; return the losses.

        The unrolled meta-gradient (second or first order, :meth:`meta_gradient_order`);
        Reptile, iMAML and the baselines override it. ``meta_step`` calls it (through
        :attr:`meta_gradient_sync` under data-parallel training).
        """
        outer = self.outer_objective()
        if self._loss_scaler is not None and self._loss_scaler.active:
            outer = self._loss_scaler.wrap(outer, self.device)
        return self._engine.meta_gradient(
            self.module, task, self.inner_loop(task, self.inner_steps),
            outer, order=self.meta_gradient_order())

    # ------------------------------------------------------------------ public API

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model (with the meta-parameters, no adaptation)."""
        return self.module(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters (where batches are moved)."""
        return self._reference().device

    def _parameter_list(self) -> list[Tensor]:
        """As ``list(self.parameters())``, from the cached walk (no module recursion)."""
        return [p for _, p in structure(self).named_parameters()]

    def _reference(self) -> Tensor:
        return structure(self.module).named_parameters()[0][1]

    def prepare(self, batch: TaskBatch | Mapping[str, Any]) -> TaskBatch:
        """Validate ``batch`` and move it to the model's device and dtype, as every call does.

        Args:
            batch: as for :meth:`meta_step`.

        Returns:
            The :class:`fastmeta.TaskBatch` the engines run.
        """
        reference = self._reference()
        plain = plain_task(batch)
        # The same shapes as a batch that needed no move nor cast: nothing to redo but the
        # label check, and no new TaskBatch.
        if plain is not None and self._unchanged_key(plain, reference) == self._unchanged:
            self._check_labels(plain)
            return plain
        task = to_model(as_task(batch), reference)
        # A batch of plain tensors like the last one needs no new check but of its labels.
        key = shapes_of(task)
        # (The example shape is in the key: setting it, or loading a state, checks again.)
        key = None if key is None else (key, self.module.training, id(self.loss_fn),
                                        self._example_shapes)
        if key is None or key != self._prepared:
            task = self._check_support_targets(task)
            self._check_loss(task)
            check_batch(task, self._example_shapes)
            self._example_shapes = support_shapes(task)
            self._prepared = key
        else:
            self._check_labels(task)
        self._unchanged = None
        if plain is not None and all(a is b for a, b in zip(task, plain)):
            self._unchanged = self._unchanged_key(plain, reference)
        return task

    def _unchanged_key(self, plain: TaskBatch, reference: Tensor) -> tuple[Any, ...]:
        """What a batch returned as given must share with the next to skip its checks."""
        return (shapes_of(plain), reference.dtype, reference.device, self.module.training,
                id(self.loss_fn), self._example_shapes)

    def _check_labels(self, task: TaskBatch) -> None:
        """Class labels are read on every batch: their values change, their shapes do not."""
        if isinstance(self.loss_fn, Loss) and self.loss_fn.name == "cross_entropy":
            self._check_loss(task)

    def _supervised_inner(self) -> bool:
        objective = self.inner_objective()
        while isinstance(objective, Proximal):
            objective = objective.base
        return isinstance(objective, SupervisedLoss)

    def _check_loss(self, task: TaskBatch, *, query: bool = True) -> None:
        """Check the targets against the model's prediction before the engine runs.

        For a named loss (:class:`fastmeta.Loss`): the model runs once per input
        signature on task 0's support set (no gradient, no dropout, the buffers copied),
        and the prediction's shape and dtype are checked against the targets of every part,
        and class labels against the number of classes, naming the task.
        """
        loss = self.loss_fn
        if not isinstance(loss, Loss):
            return
        parts = []
        if task.support_y is not None and self._supervised_inner():
            parts.append(("support", task.support_y, task.support_shots))
        if query:
            parts.append(("query", task.query_y, int(leaves(task.query_x)[0].shape[1])))
        if not parts:
            return
        spec = self._output_spec(task)
        if spec is None:
            return
        rest, dtype = spec
        for role, target, shots in parts:
            if not isinstance(target, Tensor):
                problem = loss.problem(torch.empty(0), target)
            else:
                problem = shape_problem(loss.name, (shots, *rest), dtype,
                                        tuple(target.shape[1:]), target.dtype)
            if problem is not None:
                raise ValueError(
                    f"{role} set of task 0 (every task has these shapes): {problem}. The "
                    f"model's output per task is {(shots, *rest)}, {role}_y is "
                    f"{describe(target)} ([tasks, shots, ...])"
                )
        if loss.name != "cross_entropy" or len(rest) < 1:
            return
        classes = rest[0]
        for role, target, _ in parts:
            if target.dtype.is_floating_point:
                continue
            found = label_problem(target, classes)
            if found is not None:
                raise ValueError(
                    f"{role}_y of task {found[0]} holds the label {found[1]}, outside the "
                    f"model's {classes} classes (its output has {classes} class scores): "
                    f"labels must lie in [0, {classes}). Relabel the classes of each task as "
                    f"0..{classes - 1} (fastmeta.data does), or widen the model's output"
                )

    def _output_spec(self, task: TaskBatch) -> tuple[tuple[int, ...], torch.dtype] | None:
        """Shape (without the examples dim) and dtype of the model's prediction on one
        task's support inputs, cached per input signature; ``None`` if it is not per example."""
        x = task.support_x
        flat = leaves(x)
        structure_key = "tensor" if isinstance(x, Tensor) else str(
            torch.utils._pytree.tree_structure(x))
        key = (structure_key, self.module.training,
               tuple((tuple(leaf.shape[1:]), leaf.dtype) for leaf in flat))
        if key in self._output_specs:
            return self._output_specs[key]
        assert isinstance(self.loss_fn, Loss)
        state = {**dict(self.module.named_parameters()),
                 **{n: b.clone() for n, b in self.module.named_buffers()}}
        first = index(x, 0)
        try:
            with torch.no_grad(), without_randomness():
                output = call(self.module, state, first)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:
            scalar = [leaf for leaf in flat if leaf.dim() == 2]
            if not scalar:
                raise
            raise ValueError(
                f"the model failed on the support inputs of task 0 ({describe(first)}): each "
                f"example is a scalar, since the inputs are [tasks, shots] = "
                f"{tuple(scalar[0].shape)} with no feature dimension. If the model takes "
                f"feature vectors, add one: x.unsqueeze(-1) ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''})"
            ) from error
        prediction = self.loss_fn.prediction(output)
        shots = task.support_shots
        spec = None
        if prediction.dim() >= 1 and prediction.shape[0] == shots:
            spec = (tuple(prediction.shape[1:]), prediction.dtype)
        self._output_specs[key] = spec
        return spec

    def _check_support_targets(self, task: TaskBatch) -> TaskBatch:
        if task.support_y is None and isinstance(self.inner_objective(), SupervisedLoss):
            raise ValueError(
                f"the support set has no targets (support_y is None: the batch's support "
                f"part holds inputs only), but {type(self).__name__}'s inner loss "
                f"loss_fn(prediction, target) needs them. Pass them (adapt(x, y), or a batch "
                f"{{'train': [x, y], ...}}), or use fastmeta.DAML, whose inner loss is learned "
                f"and needs no targets"
            )
        return task

    def meta_loss(self, batch: TaskBatch | Mapping[str, Any]) -> Tensor:
        """Mean query loss after adaptation, differentiable w.r.t. the meta-parameters.

        ``meta_step`` is the usual entry point; this is for custom outer loops and for
        checking gradients. It keeps every task's graph alive at once.
        """
        task = self.prepare(batch)
        self._check_engine("meta_gradient", lambda: task)
        with autocast(self._precision, lambda: self.device):
            losses = self._engine.meta_loss(
                self.module, task, self.inner_loop(task, self.inner_steps),
                self.outer_objective(), order=self.meta_gradient_order())
        assert losses.objectives is not None
        return losses.objectives.mean()

    def meta_step(
        self, batch: TaskBatch | Mapping[str, Any], optimizer: torch.optim.Optimizer
    ) -> MetaStepResult:
        """One outer update: adapt to every task, then step ``optimizer`` on the meta-loss.

        Zeroes the gradients, writes the meta-gradient into ``.grad`` of every
        meta-parameter (left there afterwards), and calls ``optimizer.step()``.
        After :func:`fastmeta.distributed.data_parallel`, ``batch`` is this process's
        share of the meta-batch, and the meta-gradient and the returned losses are those
        of the whole meta-batch (every process's tasks).

        Args:
            batch: ``{"train": [x, y], "test": [x, y]}`` (or ``support``/``query``) with
                tensors ``[tasks, shots, ...]``, or a :class:`fastmeta.TaskBatch`.
            optimizer: the user's outer optimiser over ``learner.parameters()``.

        Returns:
            The mean and per-task query losses and the inner support losses.

        Raises:
            DivergenceError: the meta-loss or meta-gradient is not finite; nothing was updated.
        """
        # an update needs gradients, even inside torch.no_grad()
        with torch.enable_grad(), explained(self, lambda: as_task(batch).support_x):
            return self._meta_step(batch, optimizer)

    def _meta_step(
        self, batch: TaskBatch | Mapping[str, Any], optimizer: torch.optim.Optimizer
    ) -> MetaStepResult:
        sync = self.meta_gradient_sync
        agree = getattr(sync, "agree", None)
        self._check_engine(
            "meta_gradient", lambda: self.prepare(batch),
            agree=None if agree is None else partial(agree, self),
        )
        engine = self._engine
        if isinstance(engine, AutoEngine) and engine.tuning_ready():
            agree_times = getattr(sync, "agree_times", None)
            engine.decide_tuning(None if agree_times is None else partial(agree_times, self))

        def local() -> MetaLosses:
            self._check_optimizer(optimizer)
            task = self.prepare(batch)
            if self._optimizer_outside:  # parameters of its own beside the learner's
                optimizer.zero_grad(set_to_none=True)
            for _, p in structure(self).named_parameters():  # as zero_grad(set_to_none=True)
                p.grad = None
            with autocast(self._precision, lambda: self.device), scaling(self._loss_scaler):
                return self.meta_gradient(task)

        output = local() if sync is None else sync(self, local)
        scaler = self._loss_scaler
        if scaler is not None:
            grads = [p.grad for _, p in structure(self).named_parameters() if p.grad is not None]
            output, skip = scaler.unscale(grads, output)
            if skip:  # a float16 overflow: leave the weights, as GradScaler does
                self.zero_grad(set_to_none=True)
                self._count_step()
                return MetaStepResult(None, output.query_losses.detach(),
                                      output.support_losses, skipped=True)
        self._check_finite(output)
        optimizer.step()
        self._count_step()
        return MetaStepResult(None, output.query_losses.detach(), output.support_losses)

    def adapt(
        self, x: Tree, y: Tree | None = None, *, steps: int | None = None
    ) -> AdaptedModel:
        """Fine-tune on one task's support set; the wrapped model is left untouched.

        Args:
            x: support inputs ``[shots, ...]``; or a tuple (the model's positional inputs)
                or a mapping (its keyword inputs, e.g. ``{"input_ids": ...,
                "attention_mask": ...}``) of such tensors.
            y: support targets ``[shots, ...]``; leave out only for learners with a
                learned inner loss (:class:`fastmeta.DAML`), which adapt on inputs alone.
            steps: inner steps (default: the learner's ``inner_steps``; 0 is allowed).

        Raises:
            TypeError: ``x`` is a whole batch (a mapping with support/query parts, or a
                :class:`fastmeta.TaskBatch`): use :meth:`adapt_many`.
            ValueError: ``x`` has one leading dimension more than the support inputs that
                :meth:`meta_step` saw (a batch ``[tasks, shots, ...]``): use :meth:`adapt_many`.

        Returns:
            An :class:`AdaptedModel`: call it on new inputs.

        Example:
            >>> adapted = learner.adapt(support_x, support_y, steps=10)
            >>> prediction = adapted(query_x)
        """
        steps = self.inner_steps if steps is None else check_steps("steps", steps, 0)
        self._check_not_a_batch(x, y)
        with explained(self, lambda: x):
            task = self._check_support_targets(to_model(single_task(x, y), self._reference()))
            self._check_loss(task, query=False)
            self._check_engine("adapt", lambda: task, steps=steps)
            output = self._adapt(task, steps)
        return AdaptedTasks(self.module, output.params, output.buffers, output.support_losses)[0]

    def _check_not_a_batch(self, x: Any, y: Any) -> None:
        """Refuse a meta-batch given to :meth:`adapt`, which adapts to one task."""
        if isinstance(x, TaskBatch) or (isinstance(x, Mapping) and any(
                key in x for key in ("train", "test", "support", "query"))):
            raise TypeError(
                f"adapt(x, y) adapts to one task, but x is a whole batch "
                f"({type(x).__name__} with support and query parts); use "
                f"learner.adapt_many(batch) to adapt to every task of a batch"
            )
        check_single_task(x, y, self._example_shapes)

    def adapt_many(
        self, batch: TaskBatch | Mapping[str, Any], *, steps: int | None = None
    ) -> AdaptedTasks:
        """Fine-tune on the support set of every task of ``batch`` at once.

        On the vectorised engine this is one call for all tasks (evaluating 600 tasks is not
        600 calls); the wrapped model is left untouched, as with :meth:`adapt`.

        Args:
            batch: tasks as for :meth:`meta_step`; only the support sets are used.
            steps: inner steps (default: the learner's ``inner_steps``; 0 is allowed).

        Returns:
            :class:`AdaptedTasks`: ``adapted(query_x)`` gives ``[tasks, n, ...]`` outputs,
            ``adapted[t]`` the model adapted to task ``t``.

        Example:
            >>> adapted = learner.adapt_many(test_batch, steps=10)
            >>> mse = ((adapted(test_batch["test"][0]) - test_batch["test"][1]) ** 2).mean()
        """
        steps = self.inner_steps if steps is None else check_steps("steps", steps, 0)
        with explained(self, lambda: as_task(batch).support_x):
            task = self.prepare(batch)
            self._check_engine("adapt", lambda: task, steps=steps)
            output = self._adapt(task, steps)
        return AdaptedTasks(self.module, output.params, output.buffers, output.support_losses)

    def _adapt(self, task: TaskBatch, steps: int) -> Adaptation:
        with torch.enable_grad(), autocast(self._precision, lambda: self.device):
            output = self._engine.adapt(self.module, task, self.inner_loop(task, steps))
        if not torch.isfinite(output.support_losses).all():
            warnings.warn(
                f"adapt: the support loss became non-finite during {steps} inner steps with "
                f"inner_lr={self.inner_lr}; the adapted weights are not usable. Use a smaller "
                f"inner_lr or fewer steps.",
                RuntimeWarning,
                stacklevel=3,
            )
        return output

    def extra_repr(self) -> str:
        return (
            f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, "
            f"first_order={self.first_order}, inner_optimizer={self.inner_optimizer.name!r}, "
            f"engine={self.engine!r}"
        )

    # ------------------------------------------------------------------ checks

    def _count_step(self) -> None:
        # A plain int attribute: nn.Module.__setattr__'s search of the parameters, buffers
        # and submodules for the name is a fixed cost per step that changes nothing here.
        self.__dict__["meta_steps_taken"] = self.meta_steps_taken + 1

    def _check_optimizer(self, optimizer: object) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer over learner.parameters(), got "
                f"{type(optimizer).__name__}; e.g. torch.optim.Adam(learner.parameters(), lr=1e-3)"
            )
        check_outer_lr(optimizer)
        # Checked again only when the optimiser, its parameter groups (add_param_group, a
        # new list) or the learner's parameters (a registration) change: a set of every
        # parameter per meta-step is a fixed cost that small models feel.
        layout = (id(optimizer), structure(self).version,
                  tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups))
        if layout == self._checked_optimizer:
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in held]
        self._optimizer_outside = bool(held - {id(p) for p in self.parameters()})
        if len(missing) == sum(1 for p in self.parameters() if p.requires_grad):
            raise ValueError(
                "optimizer holds none of the learner's meta-parameters; build it with "
                "torch.optim.Adam(learner.parameters(), lr=...)"
            )
        self._checked_optimizer = layout
        if missing and not self._warned_optimizer:
            self._warned_optimizer = True
            warnings.warn(
                f"optimizer does not hold the meta-parameters {missing[:5]}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                + "; they get gradients but are never updated. Build the optimizer from "
                "learner.parameters() to train them.",
                UserWarning,
                stacklevel=3,
            )

    def _check_finite(self, output: MetaLosses) -> None:
        """Raise :class:`DivergenceError` (clearing ``.grad``) if anything is not finite."""
        meta_step = self.meta_steps_taken + 1
        grads = [p.grad for _, p in structure(self).named_parameters()]
        grads.append(output.support_losses)
        grads.append(output.query_losses.detach())
        if unscale_and_check([g for g in grads if g is not None]):
            return  # one fused check and one device sync in the common case
        named = [(n, p.grad) for n, p in structure(self).named_parameters()
                 if p.grad is not None]
        bad_grads = [name for name, g in named if not torch.isfinite(g).all()]
        finite_support = torch.isfinite(output.support_losses)
        finite_query = torch.isfinite(output.query_losses)
        self.zero_grad(set_to_none=True)
        broken = non_finite_parameters(self)
        if broken:
            raise DivergenceError(
                f"meta-step {meta_step}: the meta-parameters {broken[:5]} were already not "
                f"finite before this meta-step: an earlier outer step wrote them (check the "
                f"outer optimiser's learning rate and the meta-gradient's scale), or they were "
                f"loaded so. Reload a checkpoint or rebuild the model",
                meta_step=meta_step, task=None, inner_step=None,
            )
        advice = (
            f"(inner_lr={self.inner_lr}, inner_steps={self.inner_steps}). The inner loop "
            f"diverged: try a smaller inner_lr, fewer inner_steps, or normalised inputs. "
            f"The meta-parameters were not updated."
        )
        if not finite_support.all():
            task, step = (int(i) for i in (~finite_support).nonzero()[0])
            raise DivergenceError(
                f"meta-step {meta_step}: the meta-loss is not finite: the support loss of task "
                f"{task} became {float(output.support_losses[task, step])} at inner step "
                f"{step + 1} of {output.support_losses.shape[1]} {advice}",
                meta_step=meta_step,
                task=task,
                inner_step=step + 1,
            )
        if not finite_query.all():
            task = int((~finite_query).nonzero()[0, 0])
            raise DivergenceError(
                f"meta-step {meta_step}: the meta-loss is not finite: the query loss of task "
                f"{task} is {float(output.query_losses[task])} after its last inner step "
                f"{advice}",
                meta_step=meta_step,
                task=task,
                inner_step=None,
            )
        raise DivergenceError(
            f"meta-step {meta_step}: the meta-gradient of {bad_grads[:5]} is not finite "
            f"although the meta-loss is {advice}",
            meta_step=meta_step,
            task=None,
            inner_step=None,
        )
