"""The fast engine: the whole meta-batch as one vectorised ``torch.func`` computation.

Per task: ``functional_call`` on the user's unmodified module, ``torch.func.grad`` for
every inner step (its result stays differentiable for second order; detached for first
order), fastmeta's update rules. ``vmap`` runs all tasks at once, and the meta-gradient comes
from one ``backward()`` of the mean meta-objective. Uncompiled, that is faster
and lighter than an outer ``torch.func.grad`` (measured: about 1.4× the time and 2× the
peak memory).

With ``compile=True`` it is the other way round: one ``torch.compile``d function takes the
outer ``torch.func.grad`` of the vectorised inner loops, and the compiler fuses the inner
loops and their differentiation whole. On the 2-core development machine, 1 thread, that
ran 1.7–1.8× as fast as compiling the meta-objective and calling ``backward()`` on it
(sine MLP, Transformer), 1.1× on Conv-4 at the Omniglot shape, where its peak memory was
11% higher. Where the meta-objective depends on tensors other than the model's parameters
(learned inner learning rates, a learned inner loss), the compiled meta-objective is
differentiated by ``backward()``.

BatchNorm: running statistics cannot be updated in place under ``vmap``/``grad``. Modules
in train mode normalise with batch statistics anyway, so for the duration of a call their
``track_running_stats`` is switched off: the outputs are those of the higher engine, and
the model's buffers are never written. Only :attr:`AdaptedModel.buffers` differ: the
higher engine returns the copy's updated running statistics, this engine the model's own.

torch's batching rules give wrong meta-gradients for batch norm, layer norm, instance norm
and embeddings with ``padding_idx``; :func:`fastmeta.engines.exact_layers` replaces them
with forms that are exact under ``vmap`` while this engine runs. Hugging Face attention
masks are built explicitly (``vectorised_masks`` in ``fastmeta/engines/_masks.py``), not
skipped after a check on their values that ``vmap`` cannot run.

Random layers (Dropout) draw their own masks for every task (``vmap`` with
``randomness="different"``), as they would with one task at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from .._structure import structure
from .._task import TaskBatch
from .._tree import Tree, call, index
from ._base import (
    Adaptation,
    Engine,
    InnerContext,
    InnerLoop,
    MetaGrad,
    MetaLosses,
    OuterObjective,
    Params,
)
from ._exact import _has_weight_norm, _layers, exact_layers, quiet_batching_fallbacks
from ._masks import vectorised_masks
from ._tuner import shape_key


def one_task(
    module: nn.Module,
    loop: InnerLoop,
    order: MetaGrad,
    outer: OuterObjective | None,
    trainable: Params,
    frozen: Params,
    buffers: Params,
    support_x: Tree,
    support_y: Tree | None,
    query_x: Tree,
    query_y: Tree,
    indices: Tensor | None,
) -> tuple[Any, ...]:
    """One task: ``(meta-objective, query loss after the last step, *support losses)``,
    the support loss before each step; without ``outer`` (adapt):
    ``(*support losses, params after the last step)``."""
    names = loop.adapted
    fixed = {**frozen, **{n: p for n, p in trainable.items() if n not in names}}
    rule = loop.optimizer.rule()

    def params_at(step: int, adapted: Params) -> Params:
        extra = loop.step_params(step) if loop.step_params is not None else {}
        return {**fixed, **extra, **adapted}

    def forward(step: int, adapted: Params, x: Tree) -> Any:
        params = params_at(step, adapted)
        return call(module, (params, buffers) if buffers else params, x)

    initial = {n: trainable[n] for n in names}
    adapted, state = dict(initial), rule.init(initial)
    objective: Tensor | None = None
    losses = []
    weights = outer.weights(loop.steps) if outer is not None else ()
    for step in range(loop.steps):
        x, y = support_x, support_y
        if indices is not None:
            x = index(support_x, indices[step])
            y = None if support_y is None else index(support_y, indices[step])

        def inner(fast: Params, step: int = step, x: Tree = x, y: Tree | None = y) -> Tensor:
            context = InnerContext(module, partial(forward, step, fast), fast, initial, x, y,
                                   step)
            return loop.objective(context)

        grads, loss = grad_and_value(inner)(adapted)
        losses.append(loss)  # detached by the caller, outside vmap (a cheaper op there)
        if order is not MetaGrad.SECOND_ORDER:
            grads = {n: g.detach() for n, g in grads.items()}
        adapted, state = rule.update(adapted, grads, state, loop.rates(step))
        if outer is not None and weights[step] != 0 and step < loop.steps - 1:
            step_loss = weights[step] * outer.loss_fn(forward(step + 1, adapted, query_x),
                                                      query_y)
            objective = step_loss if objective is None else objective + step_loss
    query_loss = None
    if outer is not None:
        query_loss = outer.loss_fn(forward(loop.steps, adapted, query_x), query_y)
        last = query_loss if weights[-1] == 1.0 else weights[-1] * query_loss
        objective = last if objective is None else objective + last
    # The adapted weights are an output only for adapt(): under vmap every output is
    # materialised for all tasks, and meta_loss() has no use for them.
    # A flat tuple: vmap and grad walk their outputs' trees on every call.
    if outer is None:
        return (*losses, params_at(loop.steps, adapted))
    assert objective is not None and query_loss is not None
    return (objective, query_loss, *losses)


def _meta_batch(
    module: nn.Module,
    loop: InnerLoop,
    order: MetaGrad,
    outer: OuterObjective | None,
    trainable: Params,
    frozen: Params,
    buffers: Params,
    task: TaskBatch,
    batch_indices: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor, Params]:
    """:func:`one_task` vectorised over the tasks of ``task``; the support losses come back
    ``[tasks, steps]`` and detached."""
    args = (*task, batch_indices)
    present = [i for i, value in enumerate(args) if value is not None]

    def per_task(*values: Any) -> tuple[Any, ...]:
        full: list[Any] = [None] * len(args)
        for i, value in zip(present, values):
            full[i] = value
        return one_task(module, loop, order, outer, trainable, frozen, buffers, *full)

    # Random layers (Dropout) draw their own masks for every task.
    out = vmap(per_task, randomness="different")(*(args[i] for i in present))
    objective: Tensor | None = None
    query_loss: Tensor | None = None
    params: Params = {}
    if outer is None:
        *losses, params = out
    else:
        objective, query_loss, *losses = out
    if losses:
        support_losses = torch.stack(losses, dim=1).detach()
    else:
        reference = next(iter(trainable.values()))
        support_losses = reference.new_zeros(task.num_tasks, 0).detach()
    return objective, query_loss, support_losses, params


def _mean_meta_batch(
    module: nn.Module,
    loop: InnerLoop,
    order: MetaGrad,
    outer: OuterObjective,
    trainable: Params,
    frozen: Params,
    buffers: Params,
    task: TaskBatch,
    batch_indices: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The mean meta-objective (to differentiate), the query and the support losses
    (detached): what a compiled meta-gradient needs, in one graph with the inner loop."""
    objectives, query_losses, support_losses, _ = _meta_batch(
        module, loop, order, outer, trainable, frozen, buffers, task, batch_indices)
    assert objectives is not None and query_losses is not None
    return objectives.mean(), query_losses.detach(), support_losses


def _meta_gradient(
    module: nn.Module,
    loop: InnerLoop,
    order: MetaGrad,
    outer: OuterObjective,
    reached: tuple[str, ...],
    by_backward: bool,
    trainable: Params,
    frozen: Params,
    buffers: Params,
    task: TaskBatch,
    batch_indices: Tensor | None,
) -> tuple[Params, Tensor, Tensor]:
    """The meta-gradient of the mean meta-objective with respect to the trainable
    parameters named in ``reached`` (the others are constants), the query and the
    support losses.

    ``torch.func.grad`` around the vectorised inner loops: the inner loops and their
    differentiation as one computation, which a compiler fuses whole. ``by_backward``: the
    same by autograd's backward, with the memory of the uncompiled engine (where compiling
    fails).
    """
    if by_backward:
        with torch.enable_grad():
            mean, query_losses, support_losses = _mean_meta_batch(
                module, loop, order, outer, trainable, frozen, buffers, task, batch_indices)
            grads = torch.autograd.grad(mean, [trainable[n] for n in reached])
        return dict(zip(reached, grads)), query_losses, support_losses
    held = {n: p for n, p in trainable.items() if n not in reached}

    def objective(differentiated: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        mean, query_losses, support_losses = _mean_meta_batch(
            module, loop, order, outer, {**held, **differentiated}, frozen, buffers, task,
            batch_indices)
        return mean, (query_losses, support_losses)

    found, (query_losses, support_losses) = torch.func.grad(objective, has_aux=True)(
        {n: trainable[n] for n in reached})
    return found, query_losses, support_losses


def _reached_parameters(mean_meta_batch: Callable[..., tuple[Tensor, Tensor, Tensor]],
                        trainable: Params, frozen: Params, buffers: Params, task: TaskBatch,
                        batch_indices: Tensor | None) -> tuple[str, ...] | None:
    """The trainable parameters that ``mean_meta_batch`` (:func:`_mean_meta_batch` of a
    configuration) depends on, read from autograd's graph of the first task (the graph of
    the others is the same); ``None`` where it depends on other tensors that require
    gradients (learned inner learning rates, a learned inner loss), whose meta-gradient
    autograd's backward writes.

    Autograd leaves a parameter that the meta-objective does not reach without ``.grad``
    (``None``), where ``torch.func.grad`` gives zeros: an optimiser skips the first and
    steps on the second (momentum, weight decay), so only the reached ones are
    differentiated.
    """
    first = TaskBatch(*(None if t is None else index(t, slice(0, 1)) for t in task))
    indices = None if batch_indices is None else batch_indices[:1]
    devices = sorted({p.device.index or 0 for p in trainable.values() if p.is_cuda})
    with torch.random.fork_rng(devices=devices), torch.enable_grad():  # dropout's draws
        mean, _, _ = mean_meta_batch(trainable, frozen, buffers, first, indices)
    leaves = _leaves(mean)
    by_id = {id(p): n for n, p in trainable.items()}
    if not leaves or any(id(leaf) not in by_id for leaf in leaves):
        return None
    found = {id(leaf) for leaf in leaves}
    return tuple(n for n, p in trainable.items() if id(p) in found)


def _leaves(output: Tensor) -> list[Tensor]:
    """The tensors at the leaves of ``output``'s autograd graph (those it accumulates a
    gradient into)."""
    if output.grad_fn is None:
        return [output] if output.requires_grad else []
    found: list[Tensor] = []
    seen: set[Any] = set()
    stack: list[Any] = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):  # AccumulateGrad
            found.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _accumulate(trainable: Params, grads: Params) -> None:
    """Add ``grads`` to the ``.grad`` of the parameters, as autograd's backward does (a
    new gradient in the parameter's memory layout)."""
    for name, grad in grads.items():
        param = trainable[name]
        if param.grad is not None:
            param.grad.add_(grad)
        elif grad.stride() == param.stride():
            param.grad = grad
        else:
            param.grad = torch.empty_like(param).copy_(grad)


def split_parameters(module: nn.Module) -> tuple[Params, Params, Params]:
    walk = structure(module)
    named = walk.named_parameters()
    trainable = {n: p for n, p in named if p.requires_grad}
    frozen = {n: p for n, p in named if not p.requires_grad}
    return trainable, frozen, walk.named_buffers()


class VmapEngine(Engine):
    """Runs the inner loops of all tasks at once with ``torch.func`` and ``vmap``.

    Args:
        compile: ``torch.compile`` the meta-gradient computation (the inner loops and
            their differentiation together), once per input shape and configuration; if
            compiling fails, warn once and run uncompiled.
        chunk_size: vectorise over groups of at most this many tasks, with one backward
            per group, so that :meth:`meta_gradient` holds one group's graph at a time
            (``None``: the whole meta-batch at once).
    """

    name = "vmap"

    def __init__(self, *, compile: bool = False, chunk_size: int | None = None) -> None:
        self.compile = compile
        self.chunk_size = chunk_size
        # (configuration, layout of the inputs) -> (the compiled function, whether it runs
        # on CUDA graphs)
        self._compiled: dict[tuple[Any, ...], tuple[Callable[..., Any], bool]] = {}
        self._settings: dict[int, tuple[Any, str]] = {}
        # (configuration, layout, shapes) -> the trainable parameters that the compiled
        # meta-gradient differentiates in its graph, or None (autograd's backward)
        self._reached: dict[tuple[Any, ...], tuple[str, ...] | None] = {}

    def splits(self, task: TaskBatch) -> bool:
        """Whether ``task`` runs in more than one chunk (otherwise as one ``vmap``)."""
        return self.chunk_size is not None and task.num_tasks > self.chunk_size

    def meta_gradient(self, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                      outer: OuterObjective, *, order: MetaGrad) -> MetaLosses:
        with quiet_batching_fallbacks():  # the backward passes run outside meta_loss
            return self._meta_gradient(module, task, loop, outer, order=order)

    def _meta_gradient(self, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                       outer: OuterObjective, *, order: MetaGrad) -> MetaLosses:
        size = self.chunk_size
        if size is None or not self.splits(task):
            if self.compile:  # the mean in the compiled graph too, as one would write it
                return self._compiled_meta_gradient(module, task, loop, outer, order)
            return super().meta_gradient(module, task, loop, outer, order=order)
        queries, supports = [], []
        for start in range(0, task.num_tasks, size):
            window = slice(start, start + size)
            part = TaskBatch(*(None if t is None else index(t, window)
                               for t in task))
            indices = loop.batch_indices
            part_loop = dataclasses.replace(
                loop, batch_indices=None if indices is None else indices[start:start + size])
            losses = self.meta_loss(module, part, part_loop, outer, order=order)
            assert losses.objectives is not None
            (losses.objectives.sum() / task.num_tasks).backward()
            queries.append(losses.query_losses)
            supports.append(losses.support_losses)
        return MetaLosses(torch.cat(queries), torch.cat(supports))

    def adapt(self, module: nn.Module, task: TaskBatch, loop: InnerLoop, *,
              order: MetaGrad = MetaGrad.NONE) -> Adaptation:
        trainable, frozen, buffers = split_parameters(module)
        second_order = order is MetaGrad.SECOND_ORDER
        with exact_layers(module, vectorised=True, second_order=second_order), \
                vectorised_masks(), quiet_batching_fallbacks(), \
                torch.no_grad() if order is MetaGrad.NONE else contextlib.nullcontext():
            _, _, support_losses, params = _meta_batch(
                module, loop, order, None, trainable, frozen, buffers, task, loop.batch_indices)
        if order is MetaGrad.NONE:
            params = {n: p.detach() for n, p in params.items()}
        expanded = {n: b.detach().unsqueeze(0).expand(task.num_tasks, *b.shape)
                    for n, b in buffers.items()}
        return Adaptation(params, expanded, support_losses)

    def meta_loss(self, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                  outer: OuterObjective, *, order: MetaGrad) -> MetaLosses:
        trainable, frozen, buffers = split_parameters(module)
        fn = partial(_meta_batch, module, loop, order, outer)
        with exact_layers(module, vectorised=True,
                          second_order=order is MetaGrad.SECOND_ORDER), vectorised_masks(), \
                quiet_batching_fallbacks():
            objectives, query_losses, support_losses, _ = self._maybe_compiled(
                fn, module, loop, outer, order)(trainable, frozen, buffers, task,
                                                loop.batch_indices)
        return MetaLosses(query_losses.detach(), support_losses, objectives)

    def _compiled_meta_gradient(self, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                                outer: OuterObjective, order: MetaGrad) -> MetaLosses:
        """The compiled meta-gradient.

        Where the meta-objective depends on the model's parameters only (read from
        autograd's graph on the first call of each configuration and layout), one
        compiled function runs the inner loops and their differentiation together
        (:func:`_meta_gradient`) and the gradients are added to ``.grad``; it
        runs in inference mode, as no gradient of its outputs is taken. Otherwise the
        compiled mean meta-objective is differentiated by autograd's backward.
        """
        trainable, frozen, buffers = split_parameters(module)
        indices = loop.batch_indices
        # vectorised_masks: the first call's eager look at the graph, and the uncompiled
        # run where compiling fails, meet Hugging Face attention masks as meta_loss does
        with exact_layers(module, vectorised=True,
                          second_order=order is MetaGrad.SECOND_ORDER), vectorised_masks():
            plan = (self._configuration(module, loop, outer, order), tuple(trainable),
                    tuple(frozen), tuple(buffers), shape_key(task))
            mean_meta_batch = partial(_mean_meta_batch, module, loop, order, outer)
            if plan not in self._reached:
                self._reached[plan] = _reached_parameters(
                    mean_meta_batch, trainable, frozen, buffers, task, indices)
            reached = self._reached[plan]
            if reached is None:
                mean, query_losses, support_losses = self._maybe_compiled(
                    mean_meta_batch, module, loop, outer, order, "mean")(
                        trainable, frozen, buffers, task, indices)
            else:
                gradient = partial(_meta_gradient, module, loop, order, outer, reached)
                call = self._maybe_compiled(partial(gradient, True), module, loop, outer,
                                            order, ("gradient", reached),
                                            partial(gradient, False))
                with torch.no_grad():
                    grads, query_losses, support_losses = call(trainable, frozen, buffers,
                                                               task, indices)
        if reached is None:
            mean.backward()
        else:
            _accumulate(trainable, grads)
        return MetaLosses(query_losses, support_losses)

    def _maybe_compiled(self, fn: Callable[..., Any], module: nn.Module, loop: InnerLoop,
                        outer: OuterObjective, order: MetaGrad, kind: Any = "per task",
                        traced: Callable[..., Any] | None = None) -> Callable[..., Any]:
        """``fn``, compiled once per configuration when ``compile=True``.

        ``traced``: the function to compile where it differs from ``fn`` (which then runs
        only if compiling fails, and must return the same).

        ``fn`` takes ``(trainable, frozen, buffers, task, batch_indices)``; the compiled
        function takes their tensors as flat positional arguments (the names and the
        task's structure are part of what it was compiled for), so that its guards check
        tensors only, as for a hand-written ``torch.compile``d function.

        On CUDA with ``mode="reduce-overhead"``: CUDA graphs replay the whole step's
        kernels with one launch, where launching them one by one costs more than the
        arithmetic of a small model.
        """
        if not self.compile:
            return fn
        if order is MetaGrad.SECOND_ORDER:
            refused = _weight_normed(module)
            if refused is not None:
                self.compile = False
                self._compiled.clear()
                warnings.warn(
                    f"compile=True: {refused} is weight-normalised, and compiled, its "
                    f"second-order meta-gradient is not exact (torch.compile bypasses the "
                    f"exact form of weight norm that the uncompiled engine uses); running "
                    f"uncompiled from now on",
                    RuntimeWarning,
                    stacklevel=5,
                )
                return fn
        key = (*self._configuration(module, loop, outer, order), kind)
        return partial(self._call_compiled, key, fn, traced or fn, module)

    def _configuration(self, module: nn.Module, loop: InnerLoop, outer: OuterObjective,
                       order: MetaGrad) -> tuple[Any, ...]:
        """What a compiled function is specific to, besides its inputs' layout."""
        known = self._settings.get(id(loop.optimizer))
        if known is None or known[0] is not loop.optimizer:  # one repr per inner optimiser
            known = self._settings[id(loop.optimizer)] = (
                loop.optimizer, repr(sorted(loop.optimizer.settings.items())))
        return (id(module), loop.adapted, loop.steps, loop.optimizer.name, known[1],
                loop.objective, loop.rates, loop.step_params, loop.batch_indices is None,
                outer, order)

    def _call_compiled(self, key: tuple[Any, ...], eager: Callable[..., Any],
                       traced: Callable[..., Any], module: nn.Module, trainable: Params,
                       frozen: Params, buffers: Params, task: TaskBatch,
                       batch_indices: Tensor | None) -> Any:
        if batch_indices is None and all(type(t) is Tensor or t is None for t in task):
            flat: list[Any] = [t for t in task if t is not None]
            spec: Any = tuple(t is None for t in task)  # the common case, without pytree
        else:
            flat, spec = torch.utils._pytree.tree_flatten((task, batch_indices))
        layout = (tuple(trainable), tuple(frozen), tuple(buffers), spec)
        found = self._compiled.get((key, layout))
        if found is None:
            cuda = structure(module).named_parameters()[0][1].is_cuda
            found = self._compiled[(key, layout)] = (
                torch.compile(_from_flat(traced, layout),
                              mode="reduce-overhead" if cuda else None), cuda)
        compiled, cuda = found
        try:
            if cuda:  # a new step: the CUDA graphs may reuse the last step's output memory
                torch.compiler.cudagraph_mark_step_begin()
            result = compiled(*trainable.values(), *frozen.values(), *buffers.values(), *flat)
            if cuda:  # losses and gradients outlive the next replay
                result = _owned_outputs(result)
            return result
        except torch.OutOfMemoryError:
            raise
        except Exception as error:
            # Run eagerly: if that fails too, the input is at fault and its error is the
            # one to see (compiling stays on); if it succeeds, the compiler failed.
            result = eager(trainable, frozen, buffers, task, batch_indices)
            self.compile = False
            self._compiled.clear()
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            warnings.warn(
                f"compile=True: torch.compile failed on this model ({type(error).__name__}: "
                f"{first_line}) where the uncompiled vectorised engine runs; running it "
                f"uncompiled from now on",
                RuntimeWarning,
                stacklevel=5,
            )
            return result


def _weight_normed(module: nn.Module) -> str | None:
    """The first weight-normalised submodule of ``module``, described; else ``None``.

    Over the layer zoo in float64, compiled second-order meta-gradients matched the
    per-task loop to rounding for every layer family but weight norm (9e-2 relative off).
    """
    routes, _ = _layers(module, vectorised=True, second_order=True)  # cached per walk
    if torch._weight_norm not in routes:
        return None
    name = next(n for n, m in module.named_modules() if _has_weight_norm(m))
    return f"submodule {name.split('.parametrizations.')[0]!r}"  # the layer, not its hook


def _owned_outputs(result: Any) -> Any:
    """``result`` with its tensors copied out of the CUDA graphs' memory, which the next
    replay overwrites (the losses outlive it in a ``MetaStepResult``, the meta-gradient
    in ``.grad``); ``clone`` keeps the gradient path of those that have one."""
    return torch.utils._pytree.tree_map_only(Tensor, torch.clone, result)


def _from_flat(fn: Callable[..., Any], layout: tuple[Any, ...]) -> Callable[..., Any]:
    """``fn(trainable, frozen, buffers, task, batch_indices)`` as a function of their
    tensors in a flat sequence, laid out as ``layout`` says."""
    trainable_names, frozen_names, buffer_names, spec = layout
    ends = (len(trainable_names), len(trainable_names) + len(frozen_names),
            len(trainable_names) + len(frozen_names) + len(buffer_names))

    def flat_fn(*tensors: Tensor) -> Any:
        trainable = dict(zip(trainable_names, tensors[:ends[0]]))
        frozen = dict(zip(frozen_names, tensors[ends[0]:ends[1]]))
        buffers = dict(zip(buffer_names, tensors[ends[1]:ends[2]]))
        rest = iter(tensors[ends[2]:])
        if isinstance(spec, tuple):  # which parts of a TaskBatch of tensors are None
            task = TaskBatch(*(None if absent else next(rest) for absent in spec))
            return fn(trainable, frozen, buffers, task, None)
        task, indices = torch.utils._pytree.tree_unflatten(list(rest), spec)
        return fn(trainable, frozen, buffers, task, indices)

    return flat_fn


__all__ = ["VmapEngine"]
